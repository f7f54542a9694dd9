"""train.py's checkpoints: saving and resuming a run through :mod:`repro.checkpoint`,
what they hold beyond the library's, and the checks that a checkpoint continues this run.

train.py saves through :class:`repro.checkpoint.Checkpointer`, with these
progress values in ``state.json``: the epoch and position, the metrics of the
completed epochs, the last test accuracy (the best checkpoint is kept), the
gradient scaler's state, the resolved config and the environment and dataset
fingerprints, and, once the run was resumed under another environment, where
and what differed (``RESUMED_ELSEWHERE``, which the manifest takes over); each
``rank-R.json`` also holds the rank's running loss sum, and ``optimizer.pt``
the lookahead's slow weights when the run has them.

:func:`check_schema` and :func:`check_counters` run before anything is applied,
so that ``--resume auto`` falls back past a checkpoint whose values do not agree
with each other or with the run.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from cifar.config import TrainConfig, UsageError, config_differences, config_to_dict
from cifar.lookahead import Lookahead
from cifar.outputs import no_checkpoint_to_resume, run_result_file
from repro import checkpoint_format
from repro.checkpoint import Checkpoint, Checkpointer, check_structure
from repro.checkpoint_format import STATE_FILE, is_count, is_number, is_sha256
from repro.fingerprint import compare_fingerprints
from repro.loader import GlobalBatchSampler
from repro.manifest import CHECKPOINTS_DIR, RESUMED_ELSEWHERE, is_environment_history
from repro.report import short

LOOKAHEAD_KEY = "lookahead"  # the tensor group of the lookahead's slow weights, when the run has them


# What every completed epoch's record must hold (train.py adds timing fields besides).
RECORD_KEYS = {
    "epoch": is_count,
    "step": is_count,
    "train_loss": is_number,
    "test_loss": is_number,
    "test_accuracy": is_number,
    "test_images": is_count,
    "lr": is_number,
}


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(key in value and check(value[key]) for key, check in RECORD_KEYS.items())


# state.json's keys besides the format's own: (check, what the value must be).
STATE_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (is_count, "a count"),
    "epoch": (is_count, "a count"),
    "position": (is_count, "a count"),
    "records": (lambda v: isinstance(v, list) and all(map(_is_record, v)), "a list of epoch records"),
    "test_accuracy": (lambda v: v is None or is_number(v), "a number or null"),
    "sampler": (lambda v: isinstance(v, dict), "a mapping"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "environment": (lambda v: isinstance(v, dict), "a mapping"),
    "dataset_sha256": (is_sha256, "a SHA-256"),
}
# Keys state.json holds only when they have something to say: the checkpoints of a run never resumed
# under another environment (all those written before the key existed) are read as holding [].
OPTIONAL_STATE_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    RESUMED_ELSEWHERE: (is_environment_history, "a list of {step, differences} records"),
}
_FORMAT_KEYS = {"format", "version", "tied", "files", "state_sha256"}  # checked by repro.checkpoint_format


def check_schema(found: Checkpoint) -> None:
    """``state.json`` holds every key of :data:`STATE_SCHEMA`, of the right type, maybe keys of
    :data:`OPTIONAL_STATE_SCHEMA`, and no other; every rank file holds an RNG state and a loss sum."""
    state = found.state
    unknown = sorted(set(state) - set(STATE_SCHEMA) - set(OPTIONAL_STATE_SCHEMA) - _FORMAT_KEYS)
    if unknown:
        raise found.error(f"{STATE_FILE} has unknown keys {short(unknown)}")
    for key, (check, description) in {**STATE_SCHEMA, **OPTIONAL_STATE_SCHEMA}.items():
        if key not in state and key in STATE_SCHEMA:
            raise found.error(f"{STATE_FILE} lacks {key!r}")
        if key in state and not check(state[key]):
            raise found.error(f"{STATE_FILE}'s {key!r} is not {description}")
    for rank in found.ranks:
        data = found.rank_state(rank)
        if set(data) != {"rng", "loss_sum"} or not is_number(data["loss_sum"]):
            raise found.error(f"rank-{rank}.json does not hold an RNG state and a loss sum")


def check_counters(
    found: Checkpoint,
    steps_per_epoch: int,
    sampler_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
) -> None:
    """The redundant counters agree with each other and with the run's steps per epoch:
    step, epoch, position, epoch records, the sampler's position, the scheduler's count.
    ``sampler_state`` is the run's own ``sampler.state_dict(0)``; call :func:`check_schema` first."""
    state = found.state
    per_epoch, epoch, position, step = steps_per_epoch, state["epoch"], state["position"], state["step"]
    if position >= per_epoch:
        raise found.error(f"position {position} is past the {per_epoch} batches of an epoch")
    if step != epoch * per_epoch + position:
        raise found.error(f"step {step} is not epoch {epoch} x {per_epoch} steps + position {position}")
    records = state["records"]
    if len(records) != epoch:
        raise found.error(f"it holds {len(records)} epoch records for {epoch} completed epochs")
    for number, record in enumerate(records, 1):
        if record["epoch"] != number or record["step"] != number * per_epoch:
            raise found.error(f"epoch record {number} says epoch {record['epoch']}, step {record['step']}")
    expected_accuracy = records[-1]["test_accuracy"] if records and position == 0 else None
    if state["test_accuracy"] != expected_accuracy:
        raise found.error(f"test_accuracy {short(state['test_accuracy'])} is not the last epoch's")
    sampler = state["sampler"]
    check_structure(found, sampler, sampler_state, "sampler")
    # At an epoch's end the sampler still names the epoch just finished, at position 0.
    if sampler["position"] != position or sampler["epoch"] != (epoch if position else epoch - 1):
        raise found.error(
            f"sampler epoch {sampler['epoch']}, position {sampler['position']} disagree with "
            f"epoch {epoch}, position {position}"
        )
    scheduler = found.scheduler_state() or {}
    if scheduler.get("last_epoch") != step:
        raise found.error(f"scheduler last_epoch {short(scheduler.get('last_epoch'))} is not step {step}")
    resumed_at = [entry["step"] for entry in state.get(RESUMED_ELSEWHERE, [])]
    if resumed_at != sorted(resumed_at) or any(resumed > step for resumed in resumed_at):
        raise found.error(f"{RESUMED_ELSEWHERE} names steps {short(resumed_at)}, not in order up to step {step}")
    if state["scaler"] is not None and scaler_state is not None:
        common = set(state["scaler"]) & set(scaler_state)
        check_structure(found, {k: state["scaler"][k] for k in common}, {k: scaler_state[k] for k in common}, "scaler")


@dataclass
class Progress:
    """Where the run is: all a resumed run needs besides weights, optimizer and RNG."""

    epoch: int = 0  # the epoch being trained (0-based)
    position: int = 0  # global batches of that epoch already trained
    step: int = 0  # optimizer steps since the run began
    records: list[dict] = field(default_factory=list)  # metrics of completed epochs
    # Each resume under another environment than its checkpoint's: {"step", "differences"} (RESUMED_ELSEWHERE).
    resumed_elsewhere: list[dict] = field(default_factory=list)


@dataclass
class Training:
    """One run's training objects: what the loop steps and a checkpoint saves and restores."""

    config: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: GlobalBatchSampler
    dataset_sha256: str  # Splits.fingerprint(): a checkpoint resumes only on the data it was trained on
    # repro.fingerprint.environment_fingerprint, taken once as the run starts: the commit of the code
    # it loaded, which checkpoints and the manifest record even if the checkout moves on meanwhile.
    environment: dict[str, Any]
    lookahead: Lookahead | None = None


def checkpoints(training: Training) -> Checkpointer:
    """The run's checkpoints (repro/checkpoint.py): the newest --keep-checkpoints and the best."""
    return Checkpointer(
        training.run_dir / CHECKPOINTS_DIR,
        training.config.keep_checkpoints,
        best_key="test_accuracy",
        log=lambda note: training.accelerator.print(f"resume: {note}"),
    )


def lookahead_tensors(training: Training) -> dict[str, dict[str, torch.Tensor]]:
    return {LOOKAHEAD_KEY: training.lookahead.slow} if training.lookahead is not None else {}


def save_checkpoint(
    training: Training, progress: Progress, loss_sum: torch.Tensor, test_accuracy: float | None = None
) -> None:
    """Write a checkpoint atomically: every rank its RNG state and loss sum, the main process the rest.

    A write that fails stops every rank with a one-line CheckpointError naming the
    folder; the checkpoints written before stay as they were.
    """
    config, accelerator, sampler = training.config, training.accelerator, training.sampler
    values = {
        "epoch": progress.epoch,
        "position": progress.position,
        "records": progress.records,
        "test_accuracy": test_accuracy,
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "config": config_to_dict(config),
        "environment": training.environment,
        "dataset_sha256": training.dataset_sha256,
    }
    if progress.resumed_elsewhere:  # only then: the checkpoint stays one that earlier code resumes
        values[RESUMED_ELSEWHERE] = progress.resumed_elsewhere
    checkpoints(training).save(
        progress.step,
        model=accelerator.unwrap_model(training.model),
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        sampler=sampler,
        batches_consumed=progress.position - sampler.start_batch,
        progress=values,
        rank_progress={"loss_sum": loss_sum.item()},
        tensors=lookahead_tensors(training),
    )


def check_continues_run(training: Training, found: Checkpoint) -> None:
    """Check, before anything is applied, that the checkpoint continues this run: the same
    config (up to run-control keys) and data, and counters that fit this run's epochs.

    Raises UsageError for an intact checkpoint of another run or other data (``--resume auto``
    must not start afresh over it), CheckpointError for one that is damaged or altered.
    """
    config, accelerator = training.config, training.accelerator
    check_schema(found)
    changed = config_differences(found.state["config"], config)
    if changed:
        raise UsageError(f"cannot resume {found.path} with a different config: {'; '.join(changed)}")
    if found.state["dataset_sha256"] != training.dataset_sha256:
        raise UsageError(
            f"cannot resume {found.path} on other data: it was trained on data with fingerprint "
            f"{found.state['dataset_sha256'][:12]}, the {config.dataset} data loaded now "
            f"(--data-dir {config.data_dir}) has {training.dataset_sha256[:12]}"
        )
    scaler_state = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    check_counters(found, len(training.sampler), training.sampler.state_dict(0), scaler_state)


def resume(training: Training) -> tuple[Progress, torch.Tensor]:
    """Restore everything from the checkpoint `--resume` names, or start afresh.

    ``auto`` finding no checkpoint it can resume in a folder that holds a run's results
    (:func:`cifar.outputs.run_result_file`) raises RunFolderError: a fresh start would replace them.
    A resume under another environment than the checkpoint's warns, and is recorded in the
    progress, for the checkpoints and the manifest to come.
    """
    config, accelerator = training.config, training.accelerator
    loss_sum = torch.zeros((), device=accelerator.device)
    if config.resume is None:
        return Progress(), loss_sum
    restored = checkpoints(training).restore(
        config.resume,
        model=accelerator.unwrap_model(training.model),
        optimizer=training.optimizer,
        scheduler=training.scheduler,
        sampler=training.sampler,
        tensors=lookahead_tensors(training),
        check=functools.partial(check_continues_run, training),
    )
    if restored is None:
        result_file = run_result_file(training.run_dir)
        if result_file is not None:  # its checkpoints all damaged, or deleted since the folder was checked
            raise no_checkpoint_to_resume(training.run_dir, result_file)
        accelerator.print("resume: no checkpoint to resume; starting from scratch")
        return Progress(), loss_sum
    state = restored.progress
    differences = compare_fingerprints(state["environment"], training.environment)
    for difference in differences:
        warnings.warn(f"environment differs, bitwise equality is no longer promised: {difference}", stacklevel=1)
    resumed_elsewhere = state.get(RESUMED_ELSEWHERE, [])
    if differences:
        resumed_elsewhere = [*resumed_elsewhere, {"step": restored.step, "differences": differences}]
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if state["environment"].get("world_size", accelerator.num_processes) != accelerator.num_processes:
        # The epoch's loss so far is the mean of the ranks' sums (finish_epoch): with another
        # number of ranks, each starts from the old ranks' mean, so that the mean stays.
        found = checkpoint_format.load(restored.path)
        sums = [found.rank_state(rank)["loss_sum"] for rank in found.ranks]
        loss_sum = torch.tensor(sum(sums) / len(sums), device=accelerator.device)
    elif restored.rank_progress is not None:
        loss_sum = torch.tensor(restored.rank_progress["loss_sum"], device=accelerator.device)
    progress = Progress(state["epoch"], state["position"], restored.step, state["records"], resumed_elsewhere)
    if config.max_steps is not None and progress.step > config.max_steps:
        raise UsageError(
            f"--max-steps {config.max_steps}: the run resumed from {restored.path} is at step {progress.step} "
            "already; give a later step, or leave it out"
        )
    accelerator.print(f"resumed from {restored.path} at step {progress.step} (epoch {progress.epoch + 1})")
    return progress, loss_sum
