"""Run train.py several times, one run after the other, in one process.

    python bench/train_runs.py RESULTS_JSON TRAIN_ARGS... [-- TRAIN_ARGS...]...

Issue 12 compares GPU times with warm-up excluded. A train.py started per run
pays CUDA's start-up (the first use of each kernel, cuDNN's and cuBLAS's
handles, the caching allocator's first blocks; in off mode cuDNN's autotuning)
in its first epoch. The GPU check (stage f) therefore runs a warm-up run and
then the timed runs, one process per determinism mode, through this
script, each group of arguments a call of ``train.main``. After each run,
RESULTS_JSON is rewritten with one entry per finished run, in order:
``{"status": 0, "wall_s": 12.3}``, or ``{"error": "..."}`` when the run raised;
the runs after a failed one still run. Exit status 0, or 2 on a usage error.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import benchlib  # noqa: F401  (puts the repository on sys.path)

import repro.hashseed

if __name__ == "__main__":
    # As train.py does for itself, before the heavy imports: the runs' manifests record
    # PYTHONHASHSEED, and their DataLoader workers inherit it.
    repro.hashseed.ensure_hash_seed()

import train


def argument_groups(arguments: list[str]) -> list[list[str]]:
    """``arguments`` split at each ``--``: one list of train.py arguments per run."""
    groups: list[list[str]] = [[]]
    for argument in arguments:
        if argument == "--":
            groups.append([])
        else:
            groups[-1].append(argument)
    return groups


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python bench/train_runs.py RESULTS_JSON TRAIN_ARGS... [-- TRAIN_ARGS...]...", file=sys.stderr)
        return 2
    results_path = Path(argv[0])
    results: list[dict[str, Any]] = []
    for arguments in argument_groups(argv[1:]):
        started = time.perf_counter()
        try:
            result: dict[str, Any] = {"status": train.main(arguments)}
        except Exception as error:  # reported in the results; the next run still runs
            result = {"error": f"{type(error).__name__}: {error}"}
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
