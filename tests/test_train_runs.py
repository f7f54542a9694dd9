"""Runs one after the other in one process (bench/train_runs.py, how the GPU check times the
speedrun recipe after a warm-up run) each give the weights the same run gives alone."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, TINY, clean_env, read_manifest


def test_a_run_after_others_in_one_process_gives_what_it_gives_alone(tmp_path, reference_run):
    results = tmp_path / "results.json"
    other_seed = [*TINY, "--seed", "7", "--output-dir", str(tmp_path / "other_seed")]
    refused = [*TINY, "--epochs", "0", "--output-dir", str(tmp_path / "refused")]
    same = [*TINY, "--output-dir", str(tmp_path / "same")]
    command = [sys.executable, "bench/train_runs.py", str(results), *other_seed, "--", *refused, "--", *same]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = json.loads(results.read_text())
    assert [entry.get("status") for entry in entries] == [0, None, 0], entries
    assert "epochs must be positive" in entries[1]["error"]
    alone = read_manifest(reference_run)
    after_others = read_manifest(tmp_path / "same")
    assert after_others["weights_sha256"] == alone["weights_sha256"]
    assert read_manifest(tmp_path / "other_seed")["weights_sha256"] != alone["weights_sha256"]
    assert after_others["python_hash_seed"] == "0"  # fixed before the imports, as train.py fixes it
