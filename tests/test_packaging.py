"""The library installs for real: a wheel of this project in a fresh venv, used from outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch
from conftest import REPO


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_pip_install_gives_the_library_and_no_pipeline(tmp_path):
    # The build reads a copy that holds the pipeline too, so a pyproject that packaged it would be caught,
    # and writes its build/ and egg-info there instead of into the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py"):
        shutil.copy2(REPO / name, source / name)
    for package in ("repro", "cifar"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # Offline: no index, no build isolation (setuptools comes from this venv), no pip configuration.
    pip_env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip_env.pop("PYTHONPATH", None)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source, cwd=tmp_path, env=pip_env)
    (wheel,) = wheels.glob("torch_repro-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site_packages = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    )
    # torch and NumPy, the declared dependencies, come from this venv: a path line in a .pth file lands
    # after the fresh venv's own site-packages, so the installed repro is the one imported.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(*pip, "--python", python, "install", "--no-deps", wheel, cwd=tmp_path, env=pip_env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = textwrap.dedent("""
        import importlib.metadata, importlib.util, json, pathlib, repro
        package = pathlib.Path(repro.__file__).parent
        files = importlib.metadata.distribution("torch-repro").files
        print(json.dumps({
            "package": str(package),
            "typed": (package / "py.typed").is_file(),
            "pipeline": [str(f) for f in files if f.parts[0] in ("cifar", "train.py")],
            "cifar": importlib.util.find_spec("cifar") is not None,
            "train": importlib.util.find_spec("train") is not None,
        }))
    """)
    installed = json.loads(run(python, "-c", probe, cwd=elsewhere, env=pip_env).stdout)
    assert Path(installed.pop("package")) == site_packages / "repro"
    assert installed == {"typed": True, "pipeline": [], "cifar": False, "train": False}
    fingerprint = json.loads(run(python, "-m", "repro", "env", "--json", cwd=elsewhere, env=pip_env).stdout)
    assert fingerprint["environment"]["torch"] == torch.__version__


def test_every_package_the_library_imports_is_a_declared_dependency():
    # The install test above borrows the dev venv's packages, so a missing declaration passes it.
    import ast
    import re
    import tomllib

    distributions = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "yaml": "pyyaml"}
    imported = set()
    for path in (REPO / "repro").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"repro", "__future__"}
    assert third_party <= set(distributions), f"map {sorted(third_party - set(distributions))} to a distribution"
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower() for requirement in declared}
    assert {distributions[module] for module in third_party} <= names
