"""airbench94 side by side: its data from an image folder, its runs, its figures.

Issue 12 judges the speedrun recipe's GPU time against airbench94's on the
same card and the same data. This project does not ship airbench94; bring the
published uncompiled script (``airbench94.py`` of the cifar10-airbench
repository) yourself, outside the repository's tracked files. This module:

- writes an image folder's ``train/`` and ``test/`` splits (decoded as
  train.py decodes them, through its decoded-image cache) as the two files
  airbench94's loader reads instead of downloading CIFAR-10 (``cifar10/train.pt``
  and ``cifar10/test.pt`` under its working folder: a dict of ``images``, uint8
  of shape (N, 32, 32, 3), ``labels``, int64, and ``classes``, the class names);
- runs the script there (it trains 25 runs in a row and prints a table row
  per epoch, then one ``eval`` row per run with its test-time-augmented
  accuracy and GPU seconds), stopped after ``--timeout-s``: the runs it
  finished are its figures, and its output is printed;
- reads the ``eval`` rows back: per run, ``tta_val_acc`` and
  ``total_time_seconds`` (CUDA events around the whitening initialisation,
  the training epochs and the final evaluation: the time issue 12 compares).

The first run of a process includes CUDA's and cuDNN's start-up (the script's
warm-up run is commented out): the summary leaves it out, as issue 12 did.

    python bench/airbench_baseline.py --script .gpu-data/airbench94.py --data-dir /tmp/cifar --out /tmp/ab
    python bench/airbench_baseline.py --data-only --data-dir /tmp/cifar --out /tmp/ab   # the data files alone
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean, median
from typing import Any

import benchlib
import torch

from cifar import data_cache
from cifar.data import class_names, imagefolder

DATA_FOLDER = "cifar10"  # where airbench94's loader looks, relative to its working folder


def write_airbench_data(data_dir: str, workdir: Path) -> dict[str, int]:
    """Write ``data_dir``'s splits as ``workdir/cifar10/{train,test}.pt``; returns the image counts.
    The images are decoded as train.py decodes them, through its decoded-image cache."""
    splits = imagefolder(data_dir, data_cache.cache_dir(data_cache.AUTO))
    classes = class_names(Path(data_dir) / "train")
    folder = workdir / DATA_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, split in (("train", splits.train), ("test", splits.test)):
        images = split.images.permute(0, 2, 3, 1).contiguous()  # airbench's loader takes height, width, channel
        torch.save({"images": images, "labels": split.labels.long(), "classes": classes}, folder / f"{name}.pt")
        counts[name] = len(split.labels)
    return counts


def parse_eval_rows(output: str) -> list[dict[str, float]]:
    """The ``eval`` rows of airbench94's table: per finished run, its ``tta_val_acc`` and
    ``total_time_seconds``. The header row names the columns; rows are ``|``-separated."""
    columns: list[str] | None = None
    runs = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if "tta_val_acc" in cells and "total_time_seconds" in cells:
            columns = cells
        elif columns is not None and len(cells) == len(columns):
            row = dict(zip(columns, cells, strict=True))
            if row.get("epoch") == "eval":
                runs.append({"tta_val_acc": float(row["tta_val_acc"]), "seconds": float(row["total_time_seconds"])})
    return runs


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean accuracy and median seconds of the runs after the first (which includes CUDA's start-up)."""
    warm = runs[1:]
    if not warm:
        return {"warm_runs": 0}
    return {
        "warm_runs": len(warm),
        "mean_tta_val_acc": mean(run["tta_val_acc"] for run in warm),
        "median_seconds": median(run["seconds"] for run in warm),
        "seconds_range": [min(run["seconds"] for run in warm), max(run["seconds"] for run in warm)],
    }


def run_script(script: Path, workdir: Path, timeout_s: float) -> tuple[str, bool]:
    """Run airbench94 in ``workdir`` until it ends or ``timeout_s``; returns its output and
    whether it was stopped. Unbuffered, so that a stopped run keeps what it printed."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(script.resolve())]
    try:
        result = subprocess.run(
            command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout or b""
        # The output of a process killed at its timeout comes as bytes, possibly cut inside a character.
        return (output.decode(errors="replace") if isinstance(output, bytes) else output), True
    if result.returncode != 0:
        sys.exit(f"airbench94 failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout, False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="an image folder with train/ and test/ (the CIFAR-10 JPEGs)")
    parser.add_argument(
        "--out", required=True, help="airbench94's working folder: its data files (about 180 MB) and its logs/"
    )
    parser.add_argument("--script", help="the published airbench94.py, brought by you")
    parser.add_argument("--timeout-s", type=float, default=75.0, help="stop the script after this many seconds")
    parser.add_argument("--data-only", action="store_true", help="write the data files and stop")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.data_only and not (args.script and Path(args.script).is_file()):
        sys.exit(f"airbench_baseline.py: error: --script names no file: {args.script!r}")
    info = benchlib.environment()
    benchlib.print_environment(info)
    workdir = Path(args.out)
    counts = write_airbench_data(args.data_dir, workdir)
    print(f"# wrote {counts['train']:,} training and {counts['test']:,} test images to {workdir / DATA_FOLDER}")
    figures: dict[str, Any] = {"images": counts}
    if not args.data_only:
        output, stopped = run_script(Path(args.script), workdir, args.timeout_s)
        print(output, end="" if output.endswith("\n") else "\n")
        runs = parse_eval_rows(output)
        figures.update(runs=runs, stopped_at_timeout=stopped, **summary(runs))
        for index, run in enumerate(runs):
            start = " (cold: CUDA's start-up)" if index == 0 else ""
            print(f"run {index}: {run['tta_val_acc']:.2%} in {run['seconds']:.3f} s{start}")
        if "median_seconds" in figures:
            print(f"warm runs: mean {figures['mean_tta_val_acc']:.2%}, median {figures['median_seconds']:.3f} s")
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), **figures})


if __name__ == "__main__":
    main()
