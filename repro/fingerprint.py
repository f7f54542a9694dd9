"""The environment fingerprint: everything bitwise equality depends on.

Two runs with the same seed and config give the same weights only on the same
software and hardware. :func:`environment_fingerprint` records that
environment (versions of Python, torch, torchvision, accelerate, NumPy, CUDA,
cuDNN, the CPU and GPU models, the CPU kernels torch chose and the variables
that choose them, the world size, torch's CPU thread count, the git commit) for the run's manifest;
:func:`compare_fingerprints` lists what differs between two of them, so that a
resumed or reproduced run can say why bitwise equality is no longer promised.
:func:`environment_report` is ``python -m repro env``: the fingerprint of this
process with the determinism settings and start-up variables it depends on.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.determinism import determinism_settings
from repro.distributed import launcher_world_size
from repro.hashseed import hash_seed_is_fixed
from repro.report import SAME, Report


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Variables that make torch (ATen) or oneDNN run CPU kernels of a lower instruction
# set than the CPU offers: other kernels, other float results, on the same CPU.
CPU_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_model() -> str | None:
    """Return the CPU's model name, or ``None`` when it cannot be told.

    On Linux, the first ``model name`` of ``/proc/cpuinfo`` (read up to that
    line only); elsewhere, or where it has none (many ARM kernels), Python's
    ``platform.processor()``, which is empty on most Linux systems.
    """
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or None


def git_state(path: str | Path = ".") -> dict[str, Any]:
    """Return ``{"commit": sha or None, "dirty": bool or None}`` for the repository at ``path``.

    Without git or a repository, the commit is ``REPRO_GIT_COMMIT`` from the
    environment (the Dockerfile sets it from its ``GIT_COMMIT`` build argument).
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        # No git or no repository (a container image): the build may have recorded the commit.
        return {"commit": os.environ.get("REPRO_GIT_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment_fingerprint(world_size: int = 1, repo: str | Path | None = None) -> dict[str, Any]:
    """Return the dict of what bitwise equality depends on.

    Args:
        world_size: the number of processes of the run.
        repo: a folder inside the git repository of the code, for its commit
            and whether the tree was dirty; ``None`` leaves them out.

    The caller adds what only it knows (the resolved config's hash, the
    dataset's fingerprint) under keys of its own.
    """
    cuda = torch.cuda.is_available()
    fingerprint: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "accelerate": _version("accelerate"),
        "numpy": np.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_model": cpu_model(),
        # The instruction set of the CPU kernels torch dispatches to (AVX2, AVX512, DEFAULT, ...):
        # the CPU's best unless ATEN_CPU_CAPABILITY lowers it. oneDNN's own choice shows only in its variables.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa_variables": {name: os.environ[name] for name in CPU_ISA_VARIABLES if name in os.environ},
        "device": "cuda" if cuda else "cpu",
        "world_size": world_size,
        # CPU kernels split work by thread, and the split changes float sums bitwise.
        "torch_threads": torch.get_num_threads(),
    }
    if repo is not None:
        git = git_state(repo)
        fingerprint["git_commit"] = git["commit"]
        fingerprint["git_dirty"] = git["dirty"]
    return fingerprint


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """List the differences between two fingerprints, one readable line each.

    An empty list means bitwise equality is still promised, as far as the
    fingerprint can tell.
    """
    differences = []
    for key in sorted(set(expected) | set(actual)):
        before, after = expected.get(key), actual.get(key)
        if before != after:
            differences.append(f"{key}: {before!r} -> {after!r}")
    return differences


def environment_facts() -> dict[str, Any]:
    """What bitwise equality depends on in this process, as JSON-compatible data.

    The environment fingerprint (with the git state of the current folder), the
    determinism settings in force, and the two variables that only take effect
    when a process starts: ``PYTHONHASHSEED`` and ``CUBLAS_WORKSPACE_CONFIG``.
    """
    return {
        "environment": environment_fingerprint(launcher_world_size() or 1, Path.cwd()),
        "determinism": determinism_settings(),
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),
        "python_hash_seed_fixed": hash_seed_is_fixed(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def environment_report(as_json: bool = False) -> Report:
    """:func:`environment_facts` as readable lines, or as one JSON document."""
    facts = environment_facts()
    if as_json:
        return Report(SAME, [json.dumps(facts, indent=2)])
    lines = ["environment:"]
    lines += [f"  {key}: {value}" for key, value in facts["environment"].items()]
    lines.append("determinism settings of this process (train.py applies its --determinism mode at start-up):")
    # The mode is None outside a training run, and CUBLAS_WORKSPACE_CONFIG gets its own line below.
    shown = {
        key: value for key, value in facts["determinism"].items() if key not in ("mode", "cublas_workspace_config")
    }
    lines += [f"  {key}: {value}" for key, value in shown.items()]
    hash_seed = facts["python_hash_seed"]
    if facts["python_hash_seed_fixed"]:
        lines.append(f"PYTHONHASHSEED: {hash_seed} (fixed since this process started)")
    else:
        state = "not set" if hash_seed is None else f"{hash_seed!r}, not fixed for this process"
        lines.append(f"PYTHONHASHSEED: {state}; train.py re-executes itself with it fixed")
    cublas = facts["cublas_workspace_config"]
    lines.append(
        f"CUBLAS_WORKSPACE_CONFIG: {cublas}"
        if cublas
        else "CUBLAS_WORKSPACE_CONFIG: not set (strict mode sets :4096:8 before CUDA starts)"
    )
    return Report(SAME, lines)
