"""examples/accelerate_train.py, and repro's guard against accelerate sharding its sampler a second time:
2 real processes over gloo, launched as a user would."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, clean_env, free_port

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU_GLOO = str(REPO / "configs" / "accelerate" / "cpu_gloo.yaml")


def launch_two_processes(script: Path) -> str:
    command = [ACCELERATE, "launch", "--config_file", CPU_GLOO, "--main_process_port", str(free_port()), str(script)]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_accelerate_example_trains_each_rank_on_its_share_and_repeats_bitwise():
    outputs = [launch_two_processes(REPO / "examples" / "accelerate_train.py") for _ in range(2)]
    for output in outputs:
        # 256 samples, 2 epochs, 2 ranks: each rank trains on half of each global batch.
        assert sorted(re.findall(r"rank (\d) trained on (\d+) samples", output)) == [("0", "256"), ("1", "256")]
    hashes = [re.findall(r"weights sha256 ([0-9a-f]{64})", output) for output in outputs]
    assert len(hashes[0]) == 1 and hashes[0] == hashes[1]


def test_preparing_a_repro_loader_raises_instead_of_training_on_nothing():
    output = launch_two_processes(REPO / "tests" / "double_shard_probe.py")
    # Both ranks print to one pipe, so their lines may interleave: count, do not split by line.
    assert sorted(re.findall(r"rank (\d) refused: ", output)) == ["0", "1"], output
    assert output.count("do not pass its DataLoader to accelerator.prepare") == 2, output
