"""bench/step_timeline.py's reading of a profiler timeline (the GPU's busy time, its gaps and the
host's waits) and stage g's line of it in bench/gpu_check.py. The GPU's rows of a real timeline
need CUDA (stage g runs there), so the trace here is written by hand, in the Chrome trace format
that torch.profiler exports."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package
import gpu_check
import step_timeline


def event(category: str, name: str, start: float, duration: float) -> dict:
    return {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration}


# Two steps of 100 µs. The GPU runs 10-90 (two overlapping kernels), 95-100 (a copy from
# pageable memory) and 150-210; step 1 waits for it once; the synchronize at 200 closes the window.
TRACE = {
    "traceEvents": [
        event("user_annotation", "train.py step 1", 0, 100),
        event("user_annotation", "next batch", 0, 30),
        event("user_annotation", "training_step", 30, 50),
        event("cuda_runtime", "cudaStreamSynchronize", 40, 5),
        event("user_annotation", "train.py step 2", 100, 100),
        event("user_annotation", "next batch", 100, 80),
        event("kernel", "convolution", 10, 50),
        event("kernel", "gelu", 50, 40),
        event("gpu_user_annotation", "training_step", 10, 80),  # the GPU's copy of a host label
        event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 95, 5),
        event("kernel", "sgd", 150, 60),
        event("cuda_runtime", "cudaDeviceSynchronize", 200, 10),
        {"ph": "i", "name": "an instant, without duration", "ts": 5},
    ]
}


def test_busy_time_gaps_and_waits_are_read_from_the_timeline():
    figures = step_timeline.analyse(TRACE, ["next batch", "training_step"])
    assert figures["steps"] == 2
    assert figures["wall_us_per_step"] == 105  # 0 to 210, the end of the last event
    assert figures["gpu_busy_us_per_step"] == (80 + 5 + 60) / 2
    assert figures["gpu_busy_fraction"] == pytest.approx(145 / 210)
    assert figures["host_us_per_step"] == {"next batch": (30 + 80) / 2, "training_step": 50 / 2}
    assert figures["waiting_calls"] == {"cudaStreamSynchronize": 1}
    assert figures["pageable_copies"] == 1
    gaps = figures["longest_gaps"]
    assert [(gap["us"], gap["step"]) for gap in gaps] == [(50, 2), (10, 1), (5, 1)]
    assert gaps[0]["during_us"] == {"next batch": 50}
    assert gaps[1]["during_us"] == {"next batch": 10}


def test_a_timeline_without_gpu_rows_gives_the_host_figures_only():
    host_only = {"traceEvents": [e for e in TRACE["traceEvents"] if e.get("cat") in ("user_annotation", None)]}
    figures = step_timeline.analyse(host_only, ["next batch"])
    assert figures["gpu_activity_recorded"] is False and "gpu_busy_fraction" not in figures
    assert figures["wall_us_per_step"] == 100
    with pytest.raises(ValueError, match="no profiler step"):
        step_timeline.analyse({"traceEvents": TRACE["traceEvents"][6:]}, [])


def test_the_gpu_checks_summary_leads_with_the_busy_share_and_names_the_waits_and_longest_gap():
    figures = step_timeline.analyse(TRACE, ["next batch"])
    figures["unprofiled_us_per_step"] = 60.0
    figures["bare"] = {**figures, "wall_us_per_step": 70.0, "gpu_busy_fraction": 0.9, "unprofiled_us_per_step": 48.0}
    figures["bare"]["recipe_unprofiled_us_per_step"] = 50.0
    line = gpu_check.timeline_summary(figures)
    assert line.startswith("69.0% (72 µs a step); 105 µs a step, 1.50 x the bare loop's;"), line
    assert "unprofiled 60 µs a step, 1.25 x the bare loop's, 1.20 x the bare loop with the recipe's" in line
    assert "waits inside: {'cudaStreamSynchronize': 1}" in line and "the bare loop's GPU busy 90.0%" in line
    assert line.endswith("longest idle 50 µs (host in next batch 50)"), line
