"""The run folder: train.py writes and clears only its own run folders, one run at a time,
with the permissions the umask gives, and a resume continues the run as it was started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    clean_env,
    free_port,
    make_folder,
    read_manifest,
    read_metrics,
    run_train,
    train_ok,
)

LOCK = ".repro-run.lock"


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` and the bytes of every file: to show that nothing changed."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize(
    ("files", "overwrite"),
    [
        # A folder with a config.yaml is not a run: --overwrite used to delete this one whole.
        ({"config.yaml": "epochs: 3\n", "src/thesis.tex": "\\chapter{One}\n"}, ["--overwrite"]),
        # Refused before too, but with advice to pass --overwrite, which was then refused as well.
        ({"notes.txt": "mine\n"}, []),
    ],
    ids=["config_and_thesis_overwrite", "notes"],
)
def test_a_folder_that_holds_no_run_is_refused_and_left_untouched(files, overwrite, tmp_path):
    folder = tmp_path / "mine"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    before = snapshot(folder)
    result = run_train(*TINY, "--output-dir", str(folder), *overwrite)
    assert_one_line_error(result, f"output folder {folder} is not empty")
    assert "is not a run folder of this project; choose another --output-dir" in result.stderr
    assert "--overwrite" not in result.stderr  # it would be refused all the same
    assert snapshot(folder) == before  # not even a lock file was written into it


def test_overwrite_refuses_a_run_folder_holding_anything_else(reference_run, tmp_path):
    run_dir = copy_of(reference_run, tmp_path)
    (run_dir / "notes.txt").write_text("mine\n")
    before = snapshot(run_dir)
    result = run_train(*TINY, "--output-dir", str(run_dir), "--overwrite")
    assert_one_line_error(result, f"{run_dir / 'notes.txt'} is not a file train.py writes; nothing was deleted")
    assert snapshot(run_dir) == before


def test_a_run_folder_is_known_by_its_formats_and_entries(reference_run, tmp_path):
    from cifar.outputs import is_run_folder, unknown_entry  # here: the old code had neither
    from repro.checkpoint_format import remove_stale_staging

    run_dir = copy_of(reference_run, tmp_path)
    assert unknown_entry(run_dir) is None
    (run_dir / "checkpoints" / "best.pt").write_text("mine\n")
    assert unknown_entry(run_dir) == run_dir / "checkpoints" / "best.pt"
    (run_dir / "checkpoints" / "best.pt").unlink()
    # Names that only begin like a checkpoint's, or its staging folder's, are the user's.
    for name in ("step-00000016.keep", "step-notes.txt", ".tmp-mine"):
        (run_dir / "checkpoints" / name).mkdir()
        assert unknown_entry(run_dir) == run_dir / "checkpoints" / name
        assert remove_stale_staging(run_dir / "checkpoints") == []
        (run_dir / "checkpoints" / name).rmdir()
    set_aside = run_dir / "checkpoints" / "set-aside"
    (set_aside / "step-00000020.1").mkdir(parents=True)
    assert unknown_entry(run_dir) is None
    (set_aside / "notes.txt").write_text("mine\n")
    assert unknown_entry(run_dir) == set_aside / "notes.txt"
    shutil.rmtree(set_aside)
    (run_dir / "curves.png").unlink()
    (run_dir / "curves.png").mkdir()  # a folder where a run writes a file
    assert unknown_entry(run_dir) == run_dir / "curves.png"

    (run_dir / ".repro-run").unlink()  # a run folder written before the marker existed
    assert is_run_folder(run_dir)  # by its manifest and checkpoints
    (run_dir / "manifest.json").write_text(json.dumps({"format": "other"}))
    assert is_run_folder(run_dir)  # by its checkpoints
    shutil.rmtree(run_dir / "checkpoints")
    assert not is_run_folder(run_dir)  # config.yaml and metrics.jsonl alone prove nothing
    (run_dir / ".repro-run").write_text(json.dumps({"format": "repro.run", "version": 1}))
    assert is_run_folder(run_dir)


def test_overwrite_knows_a_run_folder_by_its_formats_and_clears_what_it_holds(reference_run, tmp_path):
    run_dir = copy_of(reference_run, tmp_path)
    # A run killed while rewriting its config and metrics: it holds no config.yaml, which made
    # --overwrite refuse it, and a temporary file of the write it was killed in.
    (run_dir / "config.yaml").unlink()
    (run_dir / "metrics.jsonl").rename(run_dir / ".metrics.jsonl.k3j4h5g6")
    (run_dir / "checkpoints" / "step-00000004").mkdir()  # a checkpoint the new run does not write
    manifest = train_ok(run_dir, "--seed", "7", "--overwrite")
    assert manifest["seed"] == 7
    assert not (run_dir / ".metrics.jsonl.k3j4h5g6").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]


def test_a_finished_run_whose_checkpoints_are_gone_is_never_started_afresh(reference_run, tmp_path):
    from cifar.config import parse_config
    from cifar.outputs import RunFolderError, check_output_dir

    # The run's checkpoints damaged, then deleted to save disk: a fresh start would replace its result.
    run_dir = copy_of(reference_run, tmp_path)
    for checkpoint in (run_dir / "checkpoints").iterdir():
        (checkpoint / "model.safetensors").write_bytes(b"damaged")
    before = snapshot(run_dir)
    no_checkpoint = f"output folder {run_dir} holds a run (manifest.json) with no checkpoint to resume; "
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "auto")
    assert_one_line_error(result, no_checkpoint, "--overwrite, or choose another --output-dir")
    assert result.stdout.count("resume: skipping checkpoint") == 2 and "scratch" not in result.stdout
    shutil.rmtree(run_dir / "checkpoints")
    result = run_train(*TINY, "--output-dir", str(run_dir), "--resume", "auto", "--max-steps", "5")
    assert_one_line_error(result, no_checkpoint)
    assert "scratch" not in result.stdout
    after = snapshot(run_dir)
    for files in (before, after):
        files.pop(LOCK, None)  # the lock file names its holder
    assert after == {name: data for name, data in before.items() if not name.startswith("checkpoints")}
    # The same check refuses a run started without --resume (on other data too), and a folder holding only metrics.
    fresh = parse_config([*TINY, "--output-dir", str(run_dir), "--data-dir", str(tmp_path / "other")])
    with pytest.raises(RunFolderError, match=re.escape(no_checkpoint)):
        check_output_dir(run_dir, fresh)
    for name in ("manifest.json", "model.safetensors", "curves.png"):
        (run_dir / name).unlink()
    with pytest.raises(RunFolderError, match=re.escape(f"{run_dir} holds a run (metrics.jsonl) with no checkpoint")):
        check_output_dir(run_dir, fresh)
    (run_dir / "metrics.jsonl").write_text("")  # a run killed before its first epoch ended: nothing to lose
    check_output_dir(run_dir, fresh)


def test_overwrite_refused_by_a_later_check_deletes_nothing(reference_run, tmp_path):
    # The folder passes its own checks; the data, read after the folder is claimed, does not.
    run_dir = copy_of(reference_run, tmp_path)
    before = snapshot(run_dir)
    missing = tmp_path / "missing"
    result = run_train(
        *TINY, "--dataset", "imagefolder", "--data-dir", str(missing), "--output-dir", str(run_dir), "--overwrite"
    )
    assert_one_line_error(result, f"image folder {missing} does not exist")
    after = snapshot(run_dir)
    for files in (before, after):
        files.pop(LOCK, None)  # the lock file names its holder
    assert after == before


def test_an_output_path_the_system_cannot_look_up_is_refused_in_one_line(tmp_path):
    from cifar.config import parse_config
    from cifar.outputs import RunFolderError, check_output_dir, resolve_config

    too_long = tmp_path / ("x" * 300)  # a name over 255 bytes
    with pytest.raises(RunFolderError, match=r"^output path .*/config\.yaml: File name too long$"):
        resolve_config(["--output-dir", str(too_long), "--resume", "latest"])
    with pytest.raises(RunFolderError, match=r"^output path .*x: File name too long$"):
        check_output_dir(too_long, parse_config(["--output-dir", str(too_long)]))
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match=r"^output path .*/file/run: Not a directory$"):
        check_output_dir(tmp_path / "file" / "run", parse_config([]))


def test_an_output_folder_inside_the_image_folders_splits_is_refused_before_it_is_made(tmp_path):
    # Made and marked before the data loaded, train/run1 became a class the data set refused,
    # and stayed: every later run on the folder failed on a class named run1.
    from cifar.config import parse_config
    from cifar.outputs import RunFolderError, check_output_dir

    data = make_folder(tmp_path / "data")
    before = snapshot(data)
    result = run_train(
        "--dataset", "imagefolder", "--data-dir", str(data), "--output-dir", str(data / "train" / "run1")
    )  # fmt: skip
    assert_one_line_error(result, "inside", "where every folder is read as a class")
    assert snapshot(data) == before
    (tmp_path / "link").symlink_to(data / "test")
    for inside in (data / "test" / "cat" / "run", tmp_path / "link" / "run"):
        config = parse_config(["--dataset", "imagefolder", "--data-dir", str(data), "--output-dir", str(inside)])
        with pytest.raises(RunFolderError, match="where every folder is read as a class"):
            check_output_dir(inside, config)
    beside = data / "runs" / "one"
    check_output_dir(beside, parse_config(["--dataset", "imagefolder", "--data-dir", str(data)]))


def test_overwrite_with_resume_is_a_usage_error(reference_run, tmp_path):
    run_dir = copy_of(reference_run, tmp_path)
    before = snapshot(run_dir)
    result = run_train(*TINY, "--output-dir", str(run_dir), "--overwrite", "--resume", "latest")
    assert_one_line_error(result, "--overwrite deletes the run that --resume would continue")
    assert snapshot(run_dir) == before


def test_run_files_have_the_permissions_the_umask_gives(tmp_path):
    run_dir = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        train_ok(run_dir, "--max-steps", "1")
    finally:
        os.umask(previous)
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "model.safetensors"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name


def test_resume_alone_continues_the_run_with_its_saved_settings(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    train_ok(run_dir, "--max-steps", "3")  # TINY's flags all differ from train.py's defaults
    before = snapshot(run_dir)
    result = run_train("--resume", "latest", "--output-dir", str(run_dir), "--lr", "0.1")
    assert_one_line_error(result, "these settings differ (lr: 0.05 -> 0.1)")
    other_file = tmp_path / "other.yaml"
    other_file.write_text("epochs: 3\n")  # a --config file's keys are given values too
    result = run_train("--config", str(other_file), "--resume", "auto", "--output-dir", str(run_dir))
    assert_one_line_error(result, "these settings differ (epochs: 2 -> 3)")
    assert snapshot(run_dir) == before
    # What the hint after SIGTERM says to run, and nothing else.
    result = run_train("--resume", "latest", "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_manifest(run_dir)["weights_sha256"] == read_manifest(reference_run)["weights_sha256"]


@contextlib.contextmanager
def held_by_a_stopped_run(run_dir: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A real training run into ``run_dir``, frozen (SIGSTOP) once it holds the folder's lock."""
    with log.open("w") as output:
        holder = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *TINY, "--output-dir", str(run_dir)],
            cwd=REPO,
            env=clean_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not _names_pid(run_dir / LOCK, holder.pid):
            assert holder.poll() is None, "the run ended without locking its folder:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not lock its folder"
            time.sleep(0.02)
        holder.send_signal(signal.SIGSTOP)
        yield holder
    finally:
        holder.kill()
        holder.wait()


def _names_pid(lock_file: Path, pid: int) -> bool:
    try:
        return json.loads(lock_file.read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_one_run_at_a_time_and_a_killed_run_frees_its_folder(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    with held_by_a_stopped_run(run_dir, tmp_path / "holder.log") as holder:
        before = snapshot(run_dir)
        result = run_train(*TINY, "--output-dir", str(run_dir), "--overwrite")
        in_use = f"run folder {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()}"
        assert_one_line_error(result, in_use)
        assert snapshot(run_dir) == before  # the lock is taken before anything is deleted
    # The holder is killed (kill -9): its lock went with it.
    train_ok(run_dir, "--resume", "auto")
    assert read_manifest(run_dir)["weights_sha256"] == read_manifest(reference_run)["weights_sha256"]
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1, 2]


@pytest.mark.slow  # every rank stopping with the main one's line: test_distributed_runs.py's refusals
def test_a_refused_main_process_stops_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = str(REPO / "configs" / "accelerate" / "cpu_gloo.yaml")
    launcher = [accelerate, "launch", "--config_file", config, "--main_process_port", str(free_port())]
    with held_by_a_stopped_run(run_dir, tmp_path / "holder.log") as holder:
        result = subprocess.run(
            [*launcher, str(REPO / "train.py"), *TINY, "--output-dir", str(run_dir), "--resume", "auto"],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=180,  # a rank left waiting for the refused one would hang until this
        )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Each rank stops with the main process's one-line error, none with a traceback of train.py's
    # (the launcher prints its own on a failed process).
    assert output.count(f"train.py: error: run folder {run_dir} is in use by pid {holder.pid}") == 2, output[-3000:]
    assert f'File "{REPO / "train.py"}"' not in output, output[-3000:]


def test_the_lock_is_never_taken_through_a_link(tmp_path):
    from cifar.runlock import lock_run_dir  # here: the old code had no lock

    precious = tmp_path / "precious.txt"
    precious.write_text("mine\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).symlink_to(precious)  # in a run folder one was sent
    with pytest.raises(OSError, match="is a symbolic link"):
        lock_run_dir(run_dir)
    assert precious.read_text() == "mine\n"
