"""The benches' counts (steps, repeats, batch sizes, workers) are checked where they are parsed:
a bad one is argparse's usage error with exit status 2, not a traceback from deep in the bench
(a division by zero, a config error) after seconds of set-up."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest
from conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import benchlib


def test_a_count_below_its_least_value_or_not_a_number_is_refused():
    assert benchlib.positive_int("3") == 3
    assert benchlib.non_negative_int("0") == 0
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a positive integer"):
            benchlib.positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a non-negative integer"):
        benchlib.non_negative_int("-1")


@pytest.mark.parametrize(
    ("bench", "flag", "value", "expected"),
    [
        ("graphed_step", "--steps", "0", "a positive integer"),
        ("real_images", "--num-workers", "-1", "a non-negative integer"),
    ],
)
def test_a_bench_refuses_a_bad_count_in_one_usage_line(bench, flag, value, expected):
    result = subprocess.run(
        [sys.executable, f"bench/{bench}.py", f"{flag}={value}"],
        cwd=REPO,
        env=clean_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"{bench}.py: error: argument {flag}: expected {expected}, got {value!r}"


def test_every_bench_count_goes_through_the_checked_types():
    # gpu_check's integers are hidden overrides for its own subprocesses; a seed may be any integer.
    allowed = {("gpu_check.py", "--batch-size"), ("gpu_check.py", "--warmup"), ("gpu_check.py", "--steps")}
    allowed |= {("loop_vs_handwritten.py", "--seed")}
    raw = {
        (path.name, flag)
        for path in (REPO / "bench").glob("*.py")
        for flag in re.findall(r'"(--[\w-]+)",\s*type=int\b', path.read_text())
    }

    assert raw == allowed
