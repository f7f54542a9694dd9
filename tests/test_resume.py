"""Exact resume: stopped anywhere (--max-steps, SIGTERM, kill -9), resumed bitwise; bad checkpoints refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    DATALOADER,
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    read_manifest,
    read_metrics,
    run_train,
    train_ok,
    without_timing,
)

from repro import checkpoint_format as checkpoint
from repro.compare import compare_runs
from repro.report import SAME, CommandError
from repro.reproduce import reproduce_run


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert read_manifest(run_dir)["weights_sha256"] == read_manifest(reference)["weights_sha256"]
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(reference))


@pytest.mark.slow  # test_trackers.py's resume test stops a run the same way and checks the same result
def test_stop_mid_epoch_with_max_steps_then_resume_latest(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    stopped = train_ok(run_dir, "--max-steps", "5")  # epoch 1 has 8 steps
    assert stopped["step"] == 5
    assert stopped["weights_sha256"] != read_manifest(reference_run)["weights_sha256"]
    train_ok(run_dir, "--resume", "latest")
    assert_same_run(run_dir, reference_run)


# Inside epoch 1, and at its end; the end, the simpler case, is slow: the suite's 10 minutes.
@pytest.mark.parametrize("max_steps", [5, pytest.param(8, marks=pytest.mark.slow)])
def test_the_same_max_steps_command_again_trains_nothing_and_an_earlier_one_is_refused(max_steps, tmp_path):
    # A re-queued job script: the run is at --max-steps already; it trained on to the end.
    run_dir = tmp_path / "run"
    stopped = train_ok(run_dir, "--resume", "auto", "--max-steps", str(max_steps))
    metrics = without_timing(read_metrics(run_dir))
    again = train_ok(run_dir, "--resume", "auto", "--max-steps", str(max_steps))
    for key in ("step", "weights_sha256", "test_accuracy", "test_loss"):
        assert again[key] == stopped[key], key
    assert without_timing(read_metrics(run_dir)) == metrics
    if max_steps == 5:
        behind = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "auto", "--max-steps", "3")
        assert_one_line_error(behind, "--max-steps 3: the run resumed from", "is at step 5 already")
        assert read_manifest(run_dir) == again and without_timing(read_metrics(run_dir)) == metrics


@pytest.mark.slow  # test_example_plain.py resumes with 0 workers a run begun with 2
def test_resume_with_workers_gives_the_same_weights(tmp_path):
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    train_ok(whole, *DATALOADER)
    train_ok(run_dir, *DATALOADER, "--max-steps", "11", "--num-workers", "2")
    train_ok(run_dir, "--resume", "latest", "--num-workers", "2")
    assert_same_run(run_dir, whole)


def test_resume_from_a_checkpoint_into_a_new_folder_continues_its_run(reference_run, tmp_path):
    # Nothing but the checkpoint and the new folder: the checkpoint's config says what the run is.
    run_dir = tmp_path / "new"
    result = run_train("--resume", str(reference_run / "checkpoints" / "step-00000008"), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_run(run_dir, reference_run)


def test_a_run_resumed_elsewhere_says_so_and_its_folder_never_describes_two_ends(reference_run, tmp_path):
    # Begun by a copy of the code outside git, whose commit the environment names (as in the Docker image).
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy(REPO / "train.py", code / "train.py")
    for package in ("cifar", "repro"):
        shutil.copytree(REPO / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    run_dir = tmp_path / "run"
    begun = subprocess.run(
        [sys.executable, str(code / "train.py"), *TINY, "--output-dir", str(run_dir), "--max-steps", "5"],
        env=clean_env(REPRO_GIT_COMMIT="0" * 40),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert begun.returncode == 0, begun.stdout[-3000:] + begun.stderr[-3000:]
    assert [(row["epoch"], row["step"]) for row in read_metrics(run_dir)] == [(1, 5)]  # epoch 1's first 5 steps

    # Resumed here (another commit) and killed once it trained past the end its manifest describes.
    process = start_training(run_dir, "--resume", "auto", "--checkpoint-every", "1")
    while not (run_dir / "checkpoints" / "step-00000006").is_dir():
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before the kill"
    for name in ("manifest.json", "model.safetensors", "curves.png"):
        assert not (run_dir / name).exists(), name

    # --max-steps at the run's last step stops nothing: recorded as none, like the uninterrupted run's.
    resumed = train_ok(run_dir, "--resume", "auto", "--max-steps", "16")
    assert_same_run(run_dir, reference_run)  # epoch 1's part replaced by its whole record
    assert resumed["config"]["max_steps"] is None and "max_steps: null\n" in (run_dir / "config.yaml").read_text()
    [resumed_elsewhere] = resumed["resumed_in_other_environments"]  # carried over the second resume
    assert resumed_elsewhere["step"] == 5
    assert resumed_elsewhere["differences"][0].startswith(f"git_commit: '{'0' * 40}' -> ")

    uninterrupted = Path(shutil.copytree(reference_run, tmp_path / "uninterrupted"))
    manifest = read_manifest(uninterrupted)
    manifest["environment"] = resumed["environment"]  # this checkout's commit may have moved since
    (uninterrupted / "manifest.json").write_text(json.dumps(manifest))
    report = compare_runs(run_dir, uninterrupted)
    assert report.status == SAME, report.lines
    resumed_elsewhere_warning = report.lines[-1]
    expected = f"warning: A ({run_dir}) was resumed at step 5 under another environment (git_commit: '{'0' * 40}' -> "
    assert resumed_elsewhere_warning.startswith(expected), report.lines

    said = []  # reproduce says so first, before it checks the script
    with pytest.raises(CommandError, match=r"^training script .*missing\.py not found"):
        reproduce_run(run_dir, script=tmp_path / "missing.py", say=said.append)
    assert said == [resumed_elsewhere_warning.replace(f"A ({run_dir})", "this run")]


def test_a_malformed_record_of_resumes_elsewhere_is_refused_and_none_is_read_as_none(reference_run):
    from cifar.checkpoint import check_schema

    found = checkpoint.load(reference_run / "checkpoints" / "step-00000008")
    check_schema(found)  # written without one, as every checkpoint before the record existed
    key = "resumed_in_other_environments"
    for malformed in ({"step": 5}, [{"step": -1, "differences": []}], [{"step": 5, "differences": "git_commit"}]):
        found.state[key] = malformed
        with pytest.raises(checkpoint.CheckpointError, match=f"state.json's '{key}' is not a list of"):
            check_schema(found)
    found.state[key] = [{"step": 5, "differences": ["git_commit: 'a' -> 'b'"]}]
    check_schema(found)


def start_training(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", str(run_dir), *args],
        cwd=REPO,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_kill_9_at_random_moments_then_resume_auto(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random()
    for _ in range(2):
        process = start_training(run_dir, "--checkpoint-every", "1", "--resume", "auto")
        wait_for_checkpoint(run_dir, process)
        # Writing a checkpoint takes most of each step, so most kills land inside one.
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
    result = run_train(*TINY, "--output-dir", str(run_dir), "--checkpoint-every", "1", "--resume", "auto")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert_same_run(run_dir, reference_run)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_killed_between_the_last_checkpoint_and_the_final_files_resume_writes_them(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    for name in ("manifest.json", "model.safetensors", "curves.png"):
        (run_dir / name).unlink()
    train_ok(run_dir, "--resume", "latest")  # nothing left to train: the last checkpoint holds the result
    assert_same_run(run_dir, reference_run)
    assert (run_dir / "curves.png").is_file()


@pytest.mark.slow  # test_distributed_runs.py signals one rank of two, through the same path
def test_sigterm_checkpoints_within_a_step_and_resume_matches(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, "--checkpoint-every", "3")
    wait_for_checkpoint(run_dir, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopped by SIGTERM at step" in output
    step = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"step-{step:08d}").is_dir()
    train_ok(run_dir, "--resume", "latest", "--checkpoint-every", "3")
    assert_same_run(run_dir, reference_run)


def stopped_run(tmp_path: Path) -> tuple[Path, list[Path]]:
    run_dir = tmp_path / "run"
    train_ok(run_dir, "--max-steps", "11", "--checkpoint-every", "2", "--keep-checkpoints", "5")
    return run_dir, sorted((run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow  # test_checkpoint_hardening.py's fallback test covers this, and 13 kinds of damage more
def test_corrupt_checkpoint_is_refused_and_auto_falls_back(reference_run, tmp_path):
    run_dir, checkpoints = stopped_run(tmp_path)
    newest = checkpoints[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "latest")
    assert result.returncode == 2
    assert f"{newest}: model.safetensors is corrupt" in result.stderr and "Traceback" not in result.stderr
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping checkpoint {newest}: model.safetensors is corrupt" in result.stdout
    assert_same_run(run_dir, reference_run)


@pytest.mark.slow  # test_checkpoint_api.py refuses altered files; test_run_folder.py changed settings
def test_incompatible_format_and_changed_config_are_refused(tmp_path):
    run_dir, checkpoints = stopped_run(tmp_path)
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "latest", "--lr", "0.1")
    assert result.returncode == 2
    assert "lr: 0.05 -> 0.1" in result.stderr
    state_file = checkpoints[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "version": 99}))
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", str(checkpoints[-1]))
    assert result.returncode == 2
    assert f"has format version 99; this code reads version {checkpoint.VERSION}" in result.stderr


class CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_in_a_checkpoint_never_runs(tmp_path):
    run_dir, checkpoints = stopped_run(tmp_path)
    marker = tmp_path / "pwned"
    optimizer_file = checkpoints[-1] / "optimizer.pt"
    optimizer_file.write_bytes(pickle.dumps({"state": CreatesMarker(marker)}))
    # Make the hash match, so that it is the loader, not the integrity check, that refuses it.
    state_file = checkpoints[-1] / "state.json"
    state = json.loads(state_file.read_text())
    state["files"]["optimizer.pt"] = hashlib.sha256(optimizer_file.read_bytes()).hexdigest()
    state["state_sha256"] = checkpoint.state_sha256(state)
    state_file.write_text(json.dumps(state))
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "latest")
    assert result.returncode == 2
    assert "optimizer.pt is not a plain tensor file and was not loaded" in result.stderr
    assert not marker.exists()


def test_yaml_tag_in_a_config_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'epochs: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = run_train(*TINY, "--config", str(config), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and f"config file {config}" in result.stderr  # refused, never constructed
    assert not marker.exists()


def test_resume_latest_without_checkpoint_is_an_error(tmp_path):
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), "--resume", "latest")
    assert result.returncode == 2 and "no checkpoint in" in result.stderr and "'latest' needs one" in result.stderr


# SIGUSR1 takes the same path as SIGTERM (train.py's JOB_STOP_SIGNALS): slow, for the suite's 10 minutes.
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_stop_signal_to_the_process_group_stops_a_run_with_workers_at_a_step(tmp_path, stop_signal):
    # scancel and SLURM's time limit signal every process of the job, DataLoader workers included
    # (torch's die of SIGTERM); `#SBATCH --signal=USR1@120` sends SIGUSR1 first.
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, *DATALOADER, "--num-workers", "2", "--checkpoint-every", "1",
         "--output-dir", str(run_dir)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    wait_for_checkpoint(run_dir, process)
    os.killpg(process.pid, stop_signal)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + stop_signal, output[-2000:]
    assert f"stopped by {stop_signal.name} at step" in output and "killed by signal" not in output
