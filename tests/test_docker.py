"""The Dockerfile passes hadolint (the engine itself does not run here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is in requirements-dev.txt; reinstall the venv"
    return found


def test_dockerfile_lints_clean():
    result = subprocess.run([hadolint(), "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_sets_what_reproducibility_needs():
    text = (REPO / "Dockerfile").read_text()
    for needed in (
        "ARG BASE_IMAGE=",
        "PYTHONHASHSEED=0",
        "CUBLAS_WORKSPACE_CONFIG=:4096:8",
        "USER 1000",
        "requirements.txt",
    ):
        assert needed in text, needed
