"""What train.py's checkpoints hold beyond :mod:`repro.checkpoint`'s, and its checks.

train.py saves through :class:`repro.checkpoint.Checkpointer`, with these
progress values in ``state.json``: the epoch and position, the metrics of the
completed epochs, the last test accuracy (the best checkpoint is kept), the
gradient scaler's state, the resolved config and the environment and dataset
fingerprints; each ``rank-R.json`` also holds the rank's running loss sum, and
``optimizer.pt`` the lookahead's slow weights when the run has them.

:func:`check_schema` and :func:`check_counters` run before anything is applied,
so that ``--resume auto`` falls back past a checkpoint whose values do not agree
with each other or with the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from repro.checkpoint import Checkpoint, check_structure
from repro.checkpoint_format import STATE_FILE, is_count, is_number, is_sha256, short

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
    "scheduler": (lambda v: isinstance(v, dict), "a mapping"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "environment": (lambda v: isinstance(v, dict), "a mapping"),
    "dataset_sha256": (is_sha256, "a SHA-256"),
}
_FORMAT_KEYS = {"format", "version", "files", "state_sha256"}  # checked by repro.checkpoint_format


def check_schema(found: Checkpoint) -> None:
    """``state.json`` holds every key of :data:`STATE_SCHEMA`, of the right type, and no other;
    every rank file holds an RNG state and a loss sum."""
    state = found.state
    unknown = sorted(set(state) - set(STATE_SCHEMA) - _FORMAT_KEYS)
    if unknown:
        raise found.error(f"{STATE_FILE} has unknown keys {short(unknown)}")
    for key, (check, description) in STATE_SCHEMA.items():
        if key not in state:
            raise found.error(f"{STATE_FILE} lacks {key!r}")
        if not check(state[key]):
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
    if state["scheduler"].get("last_epoch") != step:
        raise found.error(f"scheduler last_epoch {short(state['scheduler'].get('last_epoch'))} is not step {step}")
    if state["scaler"] is not None and scaler_state is not None:
        common = set(state["scaler"]) & set(scaler_state)
        check_structure(found, {k: state["scaler"][k] for k in common}, {k: scaler_state[k] for k in common}, "scaler")
