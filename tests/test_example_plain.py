"""examples/plain_train.py, run for real: stopped and killed runs resume to the
uninterrupted run's weights, and `python -m repro verify` finds it reproducible."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, clean_env

EXAMPLE = str(REPO / "examples" / "plain_train.py")


def run_example(out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, EXAMPLE, "--out", str(out), *args],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_stopped_and_killed_runs_resume_to_the_uninterrupted_weights(tmp_path):
    reference, run_dir = run_example(tmp_path / "reference"), tmp_path / "run"
    assert reference.startswith("step 12 weights ")
    assert run_example(run_dir, "--stop-at", "5").startswith("step 5 ")  # inside epoch 2
    assert run_example(run_dir, "--stop-at", "8").startswith("step 8 ")  # at an epoch's end
    process = subprocess.Popen([sys.executable, EXAMPLE, "--out", str(run_dir)], cwd=REPO, env=clean_env())
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-00000009").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -signal.SIGKILL  # the kill landed: the run had not finished on its own
    assert run_example(run_dir, "--workers", "0") == reference  # the worker count is not part of the result


@pytest.mark.slow  # 16 s; make test runs verify on train.py (test_verify.py) and resumes this example
def test_verify_reports_the_example_reproducible(tmp_path):
    command = [sys.executable, "-m", "repro", "verify", "--steps", "6", "--", sys.executable, EXAMPLE]
    command += ["--out", "unused"]
    result = subprocess.run(command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bitwise reproducible over 6 steps" in result.stdout
    assert not (tmp_path / "unused").exists()  # the traced runs wrote into the verifier's folder
