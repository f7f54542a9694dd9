"""bench/host_overhead.py, issue 12's measure of train.py's host time per step: on a CPU it
estimates the host time at the recipe's batch from a run at a small batch, and that estimate
holds only if the host arrays (the epoch's order and augmentation parameters) are clocked
where train.py makes them."""

from __future__ import annotations

import json
import subprocess
import sys
from statistics import median

from conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import host_overhead


def test_the_estimate_is_the_small_batch_step_with_the_recipe_batchs_host_arrays():
    recipe_batch = [
        {"whole step": 2000.0, host_overhead.ORDER: 20.0, host_overhead.PARAMS: 40.0},
        {"whole step": 2100.0, host_overhead.ORDER: 30.0, host_overhead.PARAMS: 50.0},
    ]
    small_batch = [{"whole step": 900.0, host_overhead.ORDER: 2.0, host_overhead.PARAMS: 3.0}, {"whole step": 800.0}]

    estimate = host_overhead.host_time_estimate(small_batch, recipe_batch)

    assert estimate == [900.0 - 5.0 + 70.0, 800.0 + 70.0]


def test_the_bench_clocks_the_host_arrays_in_both_runs_and_judges_the_estimate_on_a_cpu(tmp_path):
    figures_path = tmp_path / "host.json"
    arguments = ["--steps", "3", "--repeats", "2", "--batch-size", "64", "--host-batch", "4"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "host_overhead.py"), *arguments, "--json", str(figures_path)],
        env=clean_env(CUDA_VISIBLE_DEVICES=""),  # the CPU's path: on CUDA nothing is estimated
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(figures_path.read_text())

    for run in ("us_per_step", "small_batch_us_per_step"):
        assert len(figures[run]) == 2
        for epoch in figures[run]:
            # Zero would mean the loop no longer calls what the bench wraps: the estimate would miss it.
            for part in (host_overhead.ORDER, host_overhead.PARAMS):
                assert 0 < epoch[part] < epoch["next batch"] < epoch["whole step"]
    assert figures["host_estimate_us_per_step"] == host_overhead.host_time_estimate(
        figures["small_batch_us_per_step"], figures["us_per_step"]
    )
    assert figures["host_us_per_step"] == median(figures["host_estimate_us_per_step"])
    assert figures["host_method"].startswith("estimated from batch 4")
