"""Trackers (--log-with): per-step loss and learning rate in tensorboard, each step once after a resume,
and a clear error for a tracker whose package is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_train, train_ok
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import assert_same_run
from torch import nn

from cifar.config import parse_config
from cifar.optim import build_optimizer
from cifar.tracking import TrackerUnavailableError, choose_tracker

STEPS_PER_EPOCH = 8  # TINY: 256 images in global batches of 32, for 2 epochs
TIMING_TAGS = ("images_per_s", "train_s", "eval_s", "elapsed_s")  # no two runs share them


def logged_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag but the timings, as (step, value) pairs, as TensorBoard shows them:
    the accumulator applies the purges that a restart's writer asked for."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag not in TIMING_TAGS]
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in tags}


def scheduled_lrs(steps: int) -> list[float]:
    """The learning rate that each of TINY's optimizer steps applies, from the schedule itself."""
    optimizer, scheduler = build_optimizer(parse_config(TINY), nn.Linear(2, 2), STEPS_PER_EPOCH)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_every_step_is_logged_once_with_its_values_even_after_a_resume(reference_run, tmp_path):
    reference = logged_scalars(reference_run)
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [step for step, _ in reference["step/train_loss"]] == steps
    # tensorboard stores float32: the rate each step applied, not the one after it.
    expected_lrs = [float(np.float32(lr)) for lr in scheduled_lrs(len(steps))]
    assert reference["step/lr"] == list(zip(steps, expected_lrs, strict=True))
    # An epoch's train_loss is its steps' losses summed in float32 on the device, over the step count.
    losses = [loss for _, loss in reference["step/train_loss"]]
    for epoch, (step, train_loss) in enumerate(reference["train_loss"]):
        total = np.float32(0)
        for loss in losses[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]:
            total += np.float32(loss)
        assert (step, train_loss) == ((epoch + 1) * STEPS_PER_EPOCH, float(np.float32(float(total) / STEPS_PER_EPOCH)))
    assert [step for step, _ in reference["test_accuracy"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]

    # Logged up to step 5, then resumed at step 3: steps 4 and 5 are logged twice and shown once, as rerun.
    run_dir = tmp_path / "run"
    train_ok(run_dir, "--max-steps", "5", "--checkpoint-every", "3")
    # Stopped inside an epoch: its steps so far, and no record of the part-epoch, which a resume would not repeat.
    assert logged_scalars(run_dir) == {tag: reference[tag][:5] for tag in ("step/train_loss", "step/lr")}
    train_ok(run_dir, "--resume", str(run_dir / "checkpoints" / "step-00000003"))
    assert logged_scalars(run_dir) == reference
    assert_same_run(run_dir, reference_run)  # resumed from a checkpoint older than the latest, too


def test_a_tracker_that_is_not_installed_is_a_one_line_error(tmp_path):
    result = run_train(*TINY, "--output-dir", str(tmp_path / "run"), "--log-with", "wandb")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "train.py: error: --log-with wandb needs the wandb package, which is not installed: pip install wandb"
    ]
    assert not (tmp_path / "run").exists()


def test_each_tracker_is_checked_before_the_run_starts():
    assert choose_tracker("tensorboard") == ("tensorboard", None)  # installed with the dev requirements
    assert choose_tracker("none") == (None, None)
    # Neither is installed here: asked for by name, each is an error that says what to install.
    with pytest.raises(TrackerUnavailableError, match=r"needs the mlflow package.*: pip install mlflow$"):
        choose_tracker("mlflow")
    with pytest.raises(TrackerUnavailableError, match=r"needs the aim package.*: pip install 'aim<4'$"):
        choose_tracker("aim")


def test_a_tracker_that_cannot_write_is_dropped_with_one_line_and_the_run_goes_on(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    train_ok(run_dir, "--max-steps", "5", "--log-with", "tensorboard")
    # A file where tensorboard's folder should be: the writer cannot start, even for root.
    shutil.rmtree(run_dir / "tensorboard")
    (run_dir / "tensorboard").write_text("not a folder")
    resumed = run_train("--resume", "latest", "--output-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notes = [line for line in resumed.stderr.splitlines() if "stopped logging" in line]
    assert len(notes) == 1 and "metrics.jsonl only" in notes[0], resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert_same_run(run_dir, reference_run)
