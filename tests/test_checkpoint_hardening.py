"""Checkpoints under attack and faults: altered, malformed or other-data checkpoints are refused
before anything is applied (``auto`` falls back past them), writes are staged and fail in one
line on a read-only folder or a full disk, links are never followed, and RNG restore is needed."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    make_folder,
    read_manifest,
    read_metrics,
    run_train,
    train_ok,
)
from safetensors.torch import load_file, save_file
from test_distributed_runs import two_process_command
from test_resume import assert_same_run

from cifar.data import imagefolder
from repro import checkpoint_format as checkpoint


@pytest.fixture(scope="module")
def many_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run stopped at step 15 of 16, with a checkpoint after every step (step 8 ends epoch 1)."""
    run_dir = tmp_path_factory.mktemp("many") / "run"
    train_ok(run_dir, "--max-steps", "15", "--checkpoint-every", "1", "--keep-checkpoints", "20")
    return run_dir


def copy_run(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return run_dir, run_dir / "checkpoints"


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:08d}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_state(folder: Path, edit: Callable[[dict], None], *, rehash: bool = True) -> None:
    """Edit state.json; with ``rehash``, as a forger would, recompute every hash so only the content is wrong."""
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    if rehash:
        if isinstance(state.get("files"), dict):
            state["files"] = {name: sha256_of(folder / name) for name in state["files"]}
        state["state_sha256"] = checkpoint.state_sha256(state)
    state_file.write_text(json.dumps(state, indent=1))


def flip_byte_in_tensor_data(path: Path) -> None:
    """Flip one byte past the safetensors header: the file still parses, only a value changes."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[(header_end + len(data)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def add_cuda_rng_state(folder: Path) -> None:
    rank_file = folder / "rank-0.json"
    rank_state = json.loads(rank_file.read_text())
    rank_state["rng"]["cuda"] = {"64": base64.b64encode(bytes(16)).decode()}
    rank_file.write_text(json.dumps(rank_state))
    edit_state(folder, lambda state: None)


def edit_optimizer_file(folder: Path, edit: Callable[[dict], None]) -> None:
    """Edit optimizer.pt (the optimizer's and the scheduler's state), rehashed as a forger would."""
    optimizer_file = folder / "optimizer.pt"
    state = torch.load(optimizer_file, weights_only=True)
    edit(state)
    torch.save(state, optimizer_file)
    edit_state(folder, lambda state: None)


def drop_optimizer_group(folder: Path) -> None:
    edit_optimizer_file(folder, lambda state: state.__setitem__("param_groups", state["param_groups"][:1]))


def set_scheduler_key(key: str, value: object) -> Callable[[Path], None]:
    return lambda folder: edit_optimizer_file(folder, lambda state: state["scheduler"].__setitem__(key, value))


def reshape_classifier(folder: Path) -> None:
    weights_file = folder / "model.safetensors"
    weights = load_file(weights_file)
    weights["classifier.weight"] = weights["classifier.weight"][:5].contiguous()
    save_file(weights, weights_file)
    edit_state(folder, lambda state: None)


def add_unlisted_rank_file(folder: Path) -> None:
    shutil.copy(folder / "rank-0.json", folder / "rank-1.json")


def set_key(key: str, value: object) -> Callable[[dict], None]:
    return lambda state: state.__setitem__(key, value)


def set_sampler_position(position: int) -> Callable[[dict], None]:
    return lambda state: state["sampler"].__setitem__("position", position)


# Damage done to checkpoint N of `many_checkpoints`, and the reason `--resume` must give.
# Step 14 is epoch 1 (0-based), position 6; step 8 ends epoch 0.
DAMAGE: dict[int, tuple[Callable[[Path], None], str]] = {
    15: (lambda f: flip_byte_in_tensor_data(f / "model.safetensors"), "model.safetensors is corrupt (its SHA-256"),
    14: (lambda f: edit_state(f, set_key("position", 4), rehash=False), "state.json is altered or corrupt"),
    13: (lambda f: edit_state(f, set_sampler_position(3)), "sampler epoch 1, position 3 disagree"),
    12: (set_scheduler_key("last_epoch", 10), "last_epoch 10 is not"),
    11: (set_scheduler_key("base_lrs", [0.5, 0.5]), "base_lrs"),
    10: (lambda f: edit_state(f, set_key("files", ["model.safetensors"])), "'files' is not a mapping"),
    9: (lambda f: edit_state(f, lambda s: s.pop("records")), "state.json lacks 'records'"),
    8: (lambda f: edit_state(f, set_key("epoch", "1")), "'epoch' is not a count"),
    7: (add_unlisted_rank_file, "holds ['rank-1.json'], which state.json does not list"),
    6: (add_cuda_rng_state, "RNG state for CUDA device '64', which this machine lacks"),
    5: (drop_optimizer_group, "optimizer.pt has 1 parameter groups, this run's optimizer 3"),
    4: (reshape_classifier, "model.safetensors: classifier.weight is (5, 64)"),
    3: (
        lambda f: edit_state(f, set_key("version", 1)),
        f"has format version 1; this code reads version {checkpoint.VERSION}",
    ),
}


def test_auto_falls_back_past_every_damaged_checkpoint_and_ignores_links(many_checkpoints, reference_run, tmp_path):
    run_dir, checkpoints = copy_run(many_checkpoints, tmp_path)
    for step, (damage, _) in DAMAGE.items():
        damage(step_dir(checkpoints, step))
    # Links to an intact checkpoint outside the run: the newest-named one would be chosen,
    # and the oldest-named one pruned through, if links were followed.
    outside = tmp_path / "elsewhere" / "step-00000015"
    shutil.copytree(step_dir(many_checkpoints / "checkpoints", 15), outside)
    for name in ("step-00000000", "step-99999999"):
        (checkpoints / name).symlink_to(outside, target_is_directory=True)
    result = run_train(
        *TINY, "--output-dir", str(run_dir), "--resume", "auto", "--checkpoint-every", "1", "--keep-checkpoints", "2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("resume: skipping")]
    assert len(skipped) == len(DAMAGE), skipped
    for line, (step, (_, reason)) in zip(skipped, DAMAGE.items(), strict=True):
        assert str(step_dir(checkpoints, step)) in line and reason in line, (step, line)
    assert f"resumed from {step_dir(checkpoints, 2)} at step 2" in result.stdout
    assert_same_run(run_dir, reference_run)
    # Pruning (--keep-checkpoints 2) went past the oldest-named link without deleting through it.
    assert {"step-00000015", "step-00000016"} <= {p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")}
    assert (checkpoints / "step-00000000").is_symlink() and (checkpoints / "step-99999999").is_symlink()
    checkpoint.load(outside)  # the links' target is untouched


@pytest.mark.parametrize(
    ("step", "mode"),
    [(14, "latest"), (6, "path"), (4, "latest")],
    ids=["altered-state-latest", "cuda-rng-path", "weight-shape-latest"],
)
def test_latest_and_path_refuse_a_damaged_checkpoint_in_one_line(many_checkpoints, tmp_path, step, mode):
    run_dir, checkpoints = copy_run(many_checkpoints, tmp_path)
    folder = step_dir(checkpoints, step)
    damage, reason = DAMAGE[step]
    damage(folder)
    for newer in range(step + 1, 16):
        shutil.rmtree(step_dir(checkpoints, newer))
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "latest" if mode == "latest" else str(folder))
    assert_one_line_error(result, str(folder), reason)


IMAGEFOLDER = ["--dataset", "imagefolder", "--model", "small_cnn", "--epochs", "2", "--batch-size", "4",
               "--lr", "0.05", "--num-workers", "0"]  # fmt: skip


def test_resume_refuses_other_data_and_accepts_a_moved_copy(tmp_path):
    data, run_dir = make_folder(tmp_path / "a", 4, test_per_class=2, seed=1), tmp_path / "run"
    other = make_folder(tmp_path / "b", 4, test_per_class=2, seed=2)  # same count, other pixels
    bigger = make_folder(tmp_path / "c", 6, test_per_class=2, seed=1)
    result = run_train(*IMAGEFOLDER, "--data-dir", str(data), "--output-dir", str(run_dir), "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    trained_on = imagefolder(str(data)).fingerprint()[:12]
    for changed in (other, bigger):
        result = run_train(*IMAGEFOLDER, "--data-dir", str(changed), "--output-dir", str(run_dir), "--resume", "latest")
        assert_one_line_error(result, "on other data", trained_on, imagefolder(str(changed)).fingerprint()[:12])
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    result = run_train(*IMAGEFOLDER, "--data-dir", str(moved), "--output-dir", str(run_dir), "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and read_manifest(run_dir)["step"] == 4


def keep_no_file_permission_override() -> None:
    """In the child, before exec: a root process loses the capabilities that let it write
    where file modes forbid, so a read-only folder is read-only to it as to any user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def limit_file_size() -> None:
    """In the child, before exec: no file may grow past 64 KiB (a checkpoint's weights are
    about 100 KiB), so a checkpoint write fails as on a full disk, with an OSError."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing


def resume_in(run_dir: Path, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", str(run_dir), "--resume", "latest"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=preexec_fn,
    )


def test_read_only_folder_and_full_disk_fail_in_one_line_and_lose_nothing(many_checkpoints, reference_run, tmp_path):
    run_dir, checkpoints = copy_run(many_checkpoints, tmp_path)
    before = sorted(p.name for p in checkpoints.iterdir())
    checkpoints.chmod(0o555)
    try:
        result = resume_in(run_dir, keep_no_file_permission_override)
    finally:
        checkpoints.chmod(0o755)
    assert_one_line_error(result, f"cannot write checkpoint {step_dir(checkpoints, 16)}", "Permission denied")
    result = resume_in(run_dir, limit_file_size)
    assert_one_line_error(result, f"cannot write checkpoint {step_dir(checkpoints, 16)}", "File too large")
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # no staging folder left, nothing removed
    result = resume_in(run_dir)  # space freed
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, reference_run)
    # The disk fills after the last checkpoint, as the final files are written: one line, and a resume writes them.
    for name in ("manifest.json", "model.safetensors", "curves.png"):
        (run_dir / name).unlink()
    result = resume_in(run_dir, limit_file_size)
    assert_one_line_error(result, f"cannot write the run's final files in {run_dir} (File too large)")
    result = resume_in(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, reference_run)


def test_a_disk_full_for_the_config_or_the_metrics_stops_in_one_line_and_resumes(tmp_path):
    # Outside the checkpoint and the final files, a full disk gave a traceback and exit 1: at
    # the start (config.yaml) and at an epoch's end (metrics.jsonl, after the checkpoint).
    run_dir = tmp_path / "run"
    command = [*TINY, "--epochs", "1", "--output-dir", str(run_dir)]

    def on_a_full_disk_for(name: str) -> subprocess.CompletedProcess:
        probe = [sys.executable, str(REPO / "tests" / "disk_full_probe.py"), name, *command]
        env = clean_env(PYTHONHASHSEED="0")
        return subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)

    result = on_a_full_disk_for(".config.yaml.*")  # written atomically, through a temporary file
    assert_one_line_error(result, "No space left on device", "config.yaml", "run the same command again")
    result = on_a_full_disk_for("metrics.jsonl")  # the same command again: the folder is this run's
    assert_one_line_error(result, "No space left on device", f"--resume latest --output-dir {run_dir}")
    assert not (run_dir / "metrics.jsonl").read_text()  # the epoch's line was never written
    checkpoint = json.loads((run_dir / "checkpoints" / "step-00000008" / "state.json").read_text())
    result = run_train(*command, "--resume", "latest")  # space freed: the checkpoint holds the run's end
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = read_metrics(run_dir)
    assert record == checkpoint["records"][0] and (run_dir / "manifest.json").is_file()


# Slow (30 s): in make test, one process's failed write is test_read_only_folder_and_full_disk_..., and two
# ranks agreeing on a failed save is test_checkpoint_library_hardening's two-process test.
@pytest.mark.slow
def test_a_failed_write_stops_both_processes_in_one_line(tmp_path):
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    command = [*two_process_command(run_dir, "--max-steps", "3"), "--checkpoint-every", "2"]
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints.chmod(0o555)
    try:
        result = subprocess.run(
            [*two_process_command(run_dir, "--resume", "latest"), "--checkpoint-every", "2"],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=keep_no_file_permission_override,
        )
    finally:
        checkpoints.chmod(0o755)
    assert result.returncode != 0
    # Each rank stops with the one line; the launcher may stop the slower one before it prints.
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert errors, result.stderr[-3000:]
    assert all(f"cannot write checkpoint {step_dir(checkpoints, 4)}" in line for line in errors), errors
    assert 'train.py", line' not in result.stderr, result.stderr[-3000:]  # no traceback from either rank
    assert "exitcode  : 2" in result.stderr  # the launcher's report: a rank exited with status 2, none hung


def incomplete_entries(checkpoints: Path) -> list[str]:
    """Entries of checkpoints/ that are not complete checkpoints: a write in progress."""
    if not checkpoints.is_dir():
        return []
    return [entry.name for entry in checkpoints.iterdir() if not (entry / "state.json").exists()]


def test_a_checkpoint_killed_mid_write_is_never_listed_nor_chosen(tmp_path):
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # resnet18's 45 MB of weights and as much momentum take a while to write: the kill lands inside.
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *TINY, "--model", "resnet18", "--synthetic-train-size", "4",
         "--batch-size", "2", "--checkpoint-every", "1", "--output-dir", str(run_dir)],
        cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 200
    while not incomplete_entries(checkpoints):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint write was seen"
        time.sleep(0.002)
    process.kill()
    process.wait()
    assert incomplete_entries(checkpoints), "the kill came after the write"
    assert checkpoint.list_checkpoints(run_dir / "checkpoints") == []  # the half-written one is never listed
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.resolve(run_dir / "checkpoints", "latest", checkpoint.load)


def test_staging_folders_of_one_step_are_distinct_and_cleaned_without_following_links(tmp_path):
    run_dir = tmp_path / "run"
    first, second = (checkpoint.new_staging(run_dir / "checkpoints", 7) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = run_dir / "checkpoints" / ".tmp-step-00000007-1-0badf00d"  # a staging name, but a link
    link.symlink_to(target, target_is_directory=True)
    assert checkpoint.list_checkpoints(run_dir / "checkpoints") == []
    assert checkpoint.remove_stale_staging(run_dir / "checkpoints") == sorted([first, second])
    assert link.is_symlink() and (target / "keep.txt").read_text() == "mine"


def test_resume_from_a_path_that_is_not_a_checkpoint_folder_says_so(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"/etc/passwd is not a checkpoint folder \(it is a file\)"):
        checkpoint.load(Path("/etc/passwd"))
    with pytest.raises(checkpoint.CheckpointError, match=r"is not a checkpoint folder: it has no state\.json"):
        checkpoint.load(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing")


@pytest.mark.slow  # test_checkpoint_api.py checks the restored draws; test_example_plain.py resumes a dropout model
def test_resume_restores_the_rng_that_dropout_draws_from(tmp_path):
    dropout = ("--model", "small_cnn_dropout", "--epochs", "1")
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    train_ok(reference, *dropout)
    train_ok(run_dir, *dropout, "--max-steps", "3")
    train_ok(run_dir, *dropout, "--resume", "latest")
    assert_same_run(run_dir, reference)


def test_state_hash_survives_a_json_round_trip():
    state = {"step": 3, "records": [{"lr": 0.1 + 0.2, "test_accuracy": 1 / 3}], "files": {}}
    assert checkpoint.state_sha256(json.loads(json.dumps(state, indent=1))) == checkpoint.state_sha256(state)
    assert checkpoint.state_sha256({**state, "step": 4}) != checkpoint.state_sha256(state)
    assert checkpoint.state_sha256({**state, "state_sha256": "x"}) == checkpoint.state_sha256(state)
