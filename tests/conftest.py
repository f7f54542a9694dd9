"""Shared helpers: run train.py for real, in a subprocess, on tiny synthetic data."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

# A run of a few seconds: 256 synthetic images, a small CNN, 2 epochs of 8 steps.
TINY = [
    "--dataset", "synthetic",
    "--synthetic-train-size", "256",
    "--synthetic-test-size", "128",
    "--model", "small_cnn",
    "--epochs", "2",
    "--batch-size", "32",
    "--lr", "0.05",
    "--num-workers", "0",
]  # fmt: skip
# The default pipeline above (device) does not start torchvision; the tests of workers and transforms add this.
DATALOADER = ["--data-pipeline", "dataloader"]


def make_folder(
    root: Path, per_class: int = 8, size: int = 32, *, test_per_class: int | None = None, seed: int = 0
) -> Path:
    """An image folder of two classes, cat and dog: ``per_class`` PNGs a class in train/ and
    ``test_per_class`` (default the same) in test/, their pixels drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", per_class if test_per_class is None else test_per_class)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 64, (size, size, 3)) + 128 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no launcher variables, one thread per op."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONHASHSEED")
    }
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def run_train(*args: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows without the fields that measure speed, which no two runs share."""
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """train.py stopped with exit status 2 and one short line on stderr, ``train.py: error: ...``,
    holding every fragment: no traceback, no warning, nothing else but the progress bars
    of a run stopped while it trained. Returns the line."""
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"epoch \d+/\d+: ", line)]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr[-2000:]
    assert len(lines[0]) < 500, lines[0][:2000]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_ok(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    """Train a tiny run into ``run_dir`` and return its manifest; fail with its output if it fails."""
    result = run_train(*TINY, "--output-dir", str(run_dir), *args, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_manifest(run_dir)


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """train.py's default data cache is in the user's cache folder: the tests' runs use their own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run with the default seed, shared by the tests that compare against it."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_ok(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def dataloader_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run's settings on the DataLoader pipeline, with no worker process."""
    run_dir = tmp_path_factory.mktemp("dataloader") / "run"
    train_ok(run_dir, *DATALOADER)
    return run_dir
