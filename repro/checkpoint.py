"""Exact resume for your own training loop: checkpoints that survive being killed
anywhere, load without running code, and are refused, never half-applied, when
damaged, altered or made for another run.

    manager = Checkpointer(run_dir / CHECKPOINTS_DIR, keep=3)
    restored = manager.restore("auto", model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler)
    start = restored.step if restored else 0
    ...  # after each optimizer step, or every N:
    manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                 batches_consumed=consumed, progress={"epoch": epoch})

A checkpoint holds the model's weights, the optimizer's state, the scheduler's
state, the :class:`~repro.loader.GlobalBatchSampler`'s position, every
process's RNG state (:mod:`repro.rng`), JSON progress values, and named groups
of extra tensors (an EMA, lookahead's slow weights). :mod:`repro.checkpoint_format`
describes the files: written atomically, hashed, and read back without pickle
(``optimizer.pt`` is a ``torch.save`` file loaded with ``weights_only=True``).

Restoring checks everything against the live objects before applying anything,
so ``auto`` can fall back past a checkpoint that does not fit and ``latest`` or a
path fail with one line. With ``torch.distributed`` initialised (accelerate does
it), call :meth:`Checkpointer.save` on every rank: each writes its RNG state, the
main rank the rest, and a write that fails on any rank raises the same
:class:`CheckpointError` on all of them.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repro import checkpoint_format as fmt
from repro.checkpoint_format import Checkpoint, CheckpointError
from repro.files import first_line
from repro.loader import GlobalBatchSampler
from repro.report import short
from repro.rng import capture_rng_state, restore_rng_state

__all__ = ["Checkpoint", "CheckpointError", "Checkpointer", "Restored"]

TensorGroups = Mapping[str, Mapping[str, torch.Tensor]]

# A parameter group's keys that restore does not compare with the live group's: the parameters;
# the learning rate, which schedulers move (checked against the scheduler's instead); and the
# switches that choose the step's kernels (load_state_dict takes the checkpoint's, so the resumed
# run computes as the run did). Every other key is a setting the run fixes, which load_state_dict
# would otherwise silently replace with the file's: betas, eps, amsgrad, momentum, weight decay, ...
_UNCHECKED_GROUP_KEYS = frozenset({"params", "param_names", "lr", "foreach", "fused", "capturable", "differentiable"})
# Settings checked even when the checkpoint lacks them (every torch version records them). The second
# are those OneCycleLR and CyclicLR add to each group; they then move momentum (SGD's) or betas[0]
# (Adam's) between base_momentum and max_momentum, so those are not fixed.
_GROUP_SETTINGS = ("momentum", "dampening", "nesterov", "weight_decay", "initial_lr")
_CYCLE_SETTINGS = ("max_lr", "min_lr", "base_momentum", "max_momentum")


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore` applied, and what the loop needs to continue."""

    path: Path
    step: int
    progress: dict[str, Any]  # the ``progress`` values saved with it
    rank_progress: dict[str, Any] | None  # this rank's ``rank_progress``; None: no file for this rank


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _agree(value: object, error: str | None) -> list[object]:
    """Gather every rank's ``value``, and raise on every rank the first ``error`` any rank had.

    The barrier between a checkpoint's parts: a write that fails on one rank (a read-only
    folder, a full disk) stops them all with the same one line, and no rank waits forever
    for one that gave up.
    """
    gathered: list[Any] = [(value, error)]
    if _distributed() and torch.distributed.get_world_size() > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (value, error))
    errors = [message for _, message in gathered if message]
    if errors:
        raise CheckpointError(errors[0])
    return [item for item, _ in gathered]


class Checkpointer:
    """Saves checkpoints into ``directory``, keeps the newest ``keep``, and restores them.

    Args:
        directory: the checkpoints folder, one subfolder per checkpoint (``run_dir / CHECKPOINTS_DIR``).
        keep: how many of the newest checkpoints :meth:`save` keeps.
        best_key: a ``progress`` key (a number, higher is better): the checkpoint with the
            highest value is kept besides the newest ``keep``.
        log: where the notes of ``auto`` go (a skipped checkpoint, none left); ``print`` on
            rank 0 by default.
    """

    def __init__(
        self,
        directory: Path | str,
        keep: int = 3,
        *,
        best_key: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int of 1 or more, got {short(keep)}")
        if best_key is not None and not isinstance(best_key, str):
            raise ValueError(f"best_key must be the name of a progress value (a str) or None, got {short(best_key)}")
        self.directory = Path(directory)
        self.keep = keep
        self.best_key = best_key
        self.log = log if log is not None else (lambda line: print(line) if _rank() == 0 else None)

    def checkpoints(self) -> list[Path]:
        """The complete checkpoint folders, oldest first."""
        return fmt.list_checkpoints(self.directory)

    def remove_stale_staging(self) -> list[Path]:
        """Delete the folders of checkpoints interrupted while being written; return them.
        When: at start-up, on the main rank only, before anything saves."""
        return fmt.remove_stale_staging(self.directory)

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        sampler: GlobalBatchSampler | None = None,
        batches_consumed: int = 0,
        progress: Mapping[str, Any] | None = None,
        rank_progress: Mapping[str, Any] | None = None,
        tensors: TensorGroups | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically, then remove the ones beyond ``keep``. A checkpoint
        of ``step`` already there is replaced once the new one is complete; if a later one
        exists, the run went back, and those of ``step`` and later are set aside
        (:func:`repro.checkpoint_format.publish`).

        When: after an optimizer step (and the scheduler's step), on every rank. Pass the
        unwrapped model. ``batches_consumed`` is the count the sampler's ``state_dict``
        takes (batches trained since this epoch's iteration began): an integer, never a
        float such as ``seen / batch_size`` (a NumPy integer or a one-element integer
        tensor is converted); it is ignored without a ``sampler``. ``progress`` holds
        JSON values the loop needs to continue (the main rank's are saved), ``rank_progress``
        this rank's own, and ``tensors`` named groups of extra tensors (an EMA's weights).

        Returns the checkpoint's folder. Raises :class:`CheckpointError` (a ``ValueError``) on
        every rank when any rank fails to write, or is given what a checkpoint cannot hold (a
        step that is not an int of 0 or more, a ``batches_consumed`` that is not an integer or
        puts the sampler outside its epoch, ``tensors`` that are not a mapping of groups, each a
        mapping of names to tensors (a module: pass its ``state_dict()``), progress values that
        are not JSON, model state that is not tensors, a scheduler state that ``weights_only``
        loading refuses), before anything is written; the checkpoints written before are intact.
        """
        main = _rank() == 0
        model_state: dict[str, torch.Tensor] = {}
        tied: dict[str, str] = {}
        try:
            final = self.directory / fmt.folder_name(step)
            progress, rank_progress = _mapping(progress, "progress"), _mapping(rank_progress, "rank_progress")
            _check_names(progress, fmt.RESERVED_KEYS, "progress")
            _check_names(rank_progress, {"rng"}, "rank_progress")
            groups = _tensor_groups(tensors)
            # Every rank: a state that fails only on the main rank, after the others wrote, would split them.
            sampler_state = None if sampler is None else sampler.state_dict(batches_consumed)
            _check_json(rank_progress, "rank_progress")
            if main:
                _check_json(progress, "progress")
                model_state, tied = _model_tensors(model)
                _check_scheduler_state(scheduler)
        except ValueError as problem:
            label = f"checkpoint step {step}" if fmt.is_count(step) else "a checkpoint"
            _agree(None, f"cannot save {label}: {problem}")
        _agree(None, None)

        def failure(error: OSError) -> str:
            return f"cannot write checkpoint {final}: {error}; the checkpoints written before it are intact"

        staging, error = None, None
        if main:
            try:
                staging = fmt.new_staging(self.directory, step)
            except OSError as problem:
                error = failure(problem)
        staging, error = _agree(staging, error)[0], None  # the main rank's folder
        try:
            fmt.write_rank_state(staging, _rank(), {"rng": capture_rng_state(), **rank_progress})
        except OSError as problem:
            error = failure(problem)
        _agree(None, error)
        if main:
            state: dict[str, Any] = {"step": step, "tied": tied}
            if sampler_state is not None:
                state["sampler"] = sampler_state
            extra = {name: {key: t.detach().cpu() for key, t in group.items()} for name, group in groups.items()}
            if scheduler is not None:
                extra[fmt.SCHEDULER_KEY] = scheduler.state_dict()
            try:
                fmt.write_main(staging, model_state, {**optimizer.state_dict(), **extra}, {**state, **progress})
                set_aside = fmt.publish(staging, step)
                if set_aside:
                    self.log(
                        f"set aside {len(set_aside)} checkpoint(s) of step {step} and later, which this run went "
                        f"back past, in {set_aside[0].parent}"
                    )
            except OSError as problem:
                error = failure(problem)
            else:
                try:
                    fmt.prune(self.directory, self.keep, self.best_key)
                except OSError as problem:
                    error = f"checkpoint step {step} written, but older ones cannot be removed: {problem}"
        _agree(None, error)
        return final

    def restore(
        self,
        mode: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        sampler: GlobalBatchSampler | None = None,
        tensors: TensorGroups | None = None,
        check: Callable[[Checkpoint], None] | None = None,
    ) -> Restored | None:
        """Restore the checkpoint ``mode`` names: ``"latest"``, ``"auto"`` or a folder's path.

        When: on every rank, after the model, optimizer, scheduler, sampler and DataLoaders
        are built (building them may draw random numbers) and before the first step.
        Pass the objects that :meth:`save` was given, the model unwrapped; ``tensors``' groups
        are restored in place. ``check``, if given, is called with each candidate before its
        content is read: raise :class:`CheckpointError` for one that does not fit (``auto``
        skips it) or another exception to stop.

        Everything is checked before anything is applied: the hashes, that the weights,
        optimizer groups, scheduler, sampler, tensor groups and every rank's RNG state fit
        the live objects. ``latest`` or a path that fails raises :class:`CheckpointError`;
        ``auto`` goes back past every failing one, saying so through ``log``, and returns
        ``None`` when none is left (and when there is none yet). ``tensors`` that are not
        groups of tensors, as :meth:`save` takes them, raise ``ValueError`` before anything is read.
        """
        tensors = _tensor_groups(tensors)

        def open_checkpoint(path: Path) -> tuple[Checkpoint, dict[str, Any]]:
            found = fmt.load(path)
            if check is not None:
                check(found)
            return found, _read_checked(found, model, optimizer, scheduler, sampler, tensors)

        opened, notes = fmt.resolve(self.directory, mode, open_checkpoint)
        for note in notes:
            self.log(note)
        if opened is None:
            return None
        found, contents = opened
        model.load_state_dict(contents["model"])
        optimizer.load_state_dict(contents["optimizer"])
        with torch.no_grad():
            for name, group in tensors.items():
                for key, tensor in group.items():
                    tensor.copy_(contents["tensors"][name][key])
        if scheduler is not None:
            scheduler.load_state_dict(contents["scheduler"])
        if sampler is not None:
            sampler.load_state_dict(found.state["sampler"])
        rank_state = contents["rank"]
        if rank_state is None:
            warnings.warn("no RNG state for this rank in the checkpoint (world size changed)", stacklevel=2)
        else:
            restore_rng_state(rank_state["rng"])
        progress = {key: value for key, value in found.state.items() if key not in fmt.RESERVED_KEYS}
        rank_progress = None if rank_state is None else {k: v for k, v in rank_state.items() if k != "rng"}
        return Restored(found.path, found.step, progress, rank_progress)


def _check_names(values: Mapping[str, Any], reserved: frozenset[str] | set[str], what: str) -> None:
    taken = sorted(set(values) & set(reserved))
    if taken or not all(isinstance(name, str) for name in values):
        raise ValueError(f"{what} keys must be strings other than {sorted(reserved)}, got {short(list(values))}")


def _mapping(values: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``values`` (``None``: none) as a dict, or ``ValueError`` if it is not a mapping."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a mapping of names to values, got a {type(values).__name__}")
    return dict(values)


def _tensor_groups(tensors: TensorGroups | None) -> dict[str, Mapping[str, torch.Tensor]]:
    """``tensors`` as a dict of named groups, each a mapping of names (strings) to tensors, or
    ``ValueError`` naming what is not: a module given for its weights, a number among them."""
    groups = _mapping(tensors, "tensors")
    _check_names(groups, fmt.OPTIMIZER_KEYS | {fmt.SCHEDULER_KEY}, "tensors")
    for name, group in groups.items():
        if not isinstance(group, Mapping):
            hint = ": pass its state_dict()" if isinstance(group, nn.Module) else ""
            raise ValueError(f"tensors[{name!r}] is a {type(group).__name__}, not a mapping of names to tensors{hint}")
        for key, value in group.items():
            if not isinstance(key, str):
                raise ValueError(f"tensors[{name!r}] has the key {short(key)}: a tensor's name must be a string")
            if not isinstance(value, torch.Tensor):
                hint = " (a number belongs in progress)" if fmt.is_number(value) else ""
                raise ValueError(f"tensors[{name!r}][{key!r}] is a {type(value).__name__}, not a tensor{hint}")
    return groups


def _check_json(values: Mapping[str, Any], what: str) -> None:
    """``values`` must be JSON values: a tensor or numpy number would stop the write half-way."""
    for key, value in values.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{what}[{key!r}] is not a JSON value ({first_line(error)}); convert it, e.g. .item()"
            ) from None


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state on the CPU, each shared tensor (tied weights) once, and the names
    left out, each mapped to the name its tensor is stored under. safetensors stores no
    shared memory; a module's extra state that is not a tensor is refused here."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    stored_as: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            module = name.removesuffix("_extra_state").removesuffix(".") or "the model itself"
            raise ValueError(
                f"the model's state {name!r} is a {type(value).__name__}, not a tensor (module {module}'s "
                "get_extra_state): a checkpoint's weights file holds tensors only"
            )
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride())
        if value.numel() and (view, value.dtype) in stored_as:
            tied[name] = stored_as[view, value.dtype]
            continue
        stored_as[view, value.dtype] = name
        tensor = value.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # part of a tensor stored already: its own copy
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors, tied


def _check_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
    """The scheduler's state must load back with ``weights_only=True`` (no code runs): a
    callable object in it, say, would make a checkpoint that every restore refuses."""
    if scheduler is None:
        return
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as error:  # the unpickler refuses with one of many types
        raise ValueError(
            f"the scheduler's state cannot be loaded back without running code ({first_line(error)})"
        ) from None


def _read_checked(
    found: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    sampler: GlobalBatchSampler | None,
    tensors: dict[str, Mapping[str, torch.Tensor]],
) -> dict[str, Any]:
    """Read the content of ``found`` and check it against the live objects; nothing is applied.
    Every rank checks every rank's RNG state, so all ranks accept or refuse the same checkpoints."""
    state = found.state
    if (sampler is None) != ("sampler" not in state):
        raise found.error(f"{'lacks' if sampler is not None else 'holds'} a sampler state, unlike this run")
    if sampler is not None:
        _check_sampler(found, state["sampler"], sampler.state_dict(0), len(sampler))
    model_state = found.model_state()
    _check_tensors(found, model_state, model.state_dict(), fmt.MODEL_FILE)
    content = found.optimizer_file()
    scheduler_state = content.pop(fmt.SCHEDULER_KEY, None)
    if (scheduler is None) != (scheduler_state is None):
        raise found.error(f"{'lacks' if scheduler is not None else 'holds'} a scheduler state, unlike this run")
    scheduler_lrs = None
    if scheduler is not None:
        _check_scheduler(found, scheduler_state, scheduler.state_dict())
        scheduler_lrs = scheduler_state.get("_last_lr")
    extra = {name: content.pop(name, None) for name in set(content) - fmt.OPTIMIZER_KEYS | set(tensors)}
    for name, saved in extra.items():
        where = f"{fmt.OPTIMIZER_FILE}'s {name}"
        if name not in tensors or saved is None:
            raise found.error(f"{where}: {'missing' if saved is None else 'present'}, unlike this run's")
        if not isinstance(saved, dict):
            raise found.error(f"{where} is not a mapping of tensors")
        _check_tensors(found, saved, tensors[name], where)
    _check_optimizer(found, content, optimizer, scheduler_lrs)
    rank_states = {rank: found.rank_state(rank) for rank in found.ranks}
    current = capture_rng_state()
    for rank, rank_state in rank_states.items():
        _check_rng_state(found, rank_state["rng"], f"rank-{rank}.json", current)
    return {
        "model": model_state,
        "optimizer": content,
        "scheduler": scheduler_state,
        "tensors": extra,
        "rank": rank_states.get(_rank()),
    }


def check_structure(found: Checkpoint, saved: Any, reference: Any, where: str) -> None:
    """``saved`` must have the shape of ``reference``: the same keys, list lengths and value types."""
    if isinstance(reference, dict):
        if not isinstance(saved, dict):
            raise found.error(f"{where} is not a mapping")
        if set(saved) != set(reference):
            extra, missing = sorted(map(str, set(saved) - set(reference))), sorted(set(reference) - set(saved))
            raise found.error(f"{where} has keys {short(extra)} it should not, lacks {short(missing)}")
        for key in reference:
            check_structure(found, saved[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        if not isinstance(saved, list) or len(saved) != len(reference):
            raise found.error(f"{where} is not a list of {len(reference)}")
        for index, (item, expected) in enumerate(zip(saved, reference, strict=True)):
            check_structure(found, item, expected, f"{where}[{index}]")
    elif type(saved) is not type(reference):
        raise found.error(f"{where} is {short(saved)}, not a {type(reference).__name__}")


def _check_scheduler(found: Checkpoint, saved: Any, live: dict[str, Any]) -> None:
    """The saved state has the live scheduler's counters, its shape, and its base rates."""
    if not isinstance(saved, dict):
        raise found.error(f"{fmt.OPTIMIZER_FILE}'s scheduler state is not a mapping")
    for key in ("last_epoch", "base_lrs", "_last_lr"):  # those the live one has (ReduceLROnPlateau: no base_lrs)
        if key in live and key not in saved:
            raise found.error(f"scheduler state lacks {key!r}")
    # Only the keys both hold: another torch version may add or drop some.
    common = set(saved) & set(live)
    check_structure(found, {k: saved[k] for k in common}, {k: live[k] for k in common}, "scheduler")
    if "base_lrs" in live and saved["base_lrs"] != live["base_lrs"]:
        raise found.error(
            f"scheduler base_lrs {short(saved['base_lrs'])} differ from this run's {short(live['base_lrs'])}"
        )


def _check_sampler(found: Checkpoint, saved: dict[str, Any], live: dict[str, Any], batches: int) -> None:
    check_structure(found, saved, live, "sampler")
    for key in ("version", "num_samples", "batch_size", "seed"):
        if saved[key] != live[key]:
            raise found.error(f"sampler {key} {saved[key]} differs from this run's {live[key]}")
    if not 0 <= saved["position"] <= batches or saved["epoch"] < 0:
        raise found.error(f"sampler epoch {saved['epoch']}, position {saved['position']} are out of range")


def _check_tensors(found: Checkpoint, saved: Mapping[str, Any], live: Mapping[str, torch.Tensor], where: str) -> None:
    """The same tensors as ``live``'s, of the same shapes and dtypes."""
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise found.error(f"{where} lacks {short(missing)} and has {short(extra)} beyond this model's")
    for name in sorted(saved):  # safetensors gives no fixed order: the first misfit by name, every time
        tensor, expected = saved[name], live[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            seen = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else short(tensor)
            raise found.error(f"{where}: {name} is {seen}, this model's is {tuple(expected.shape)} {expected.dtype}")


def _check_optimizer(
    found: Checkpoint, saved: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler_lrs: list[Any] | None
) -> None:
    """The same parameter groups as ``optimizer``'s, with the same sizes and settings, each
    group's learning rate the scheduler's, and per-parameter state shaped like its parameter."""
    name = fmt.OPTIMIZER_FILE
    if set(saved) != fmt.OPTIMIZER_KEYS:
        raise found.error(f"{name} does not hold an optimizer state")
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        count = len(groups) if isinstance(groups, list) else short(groups)
        raise found.error(f"{name} has {count} parameter groups, this run's optimizer {len(live_groups)}")
    parameters: dict[Any, torch.Tensor] = {}
    for index, (group, live) in enumerate(zip(groups, live_groups, strict=True)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise found.error(f"{name}: parameter group {index} is malformed")
        if len(group["params"]) != len(live["params"]):
            raise found.error(
                f"{name}: parameter group {index} has {len(group['params'])} parameters, "
                f"this run's {len(live['params'])}"
            )
        _check_group_settings(found, group, live, f"{name}: group {index}")
        lr = group.get("lr")
        if not fmt.is_number(lr) or (
            scheduler_lrs is not None and (index >= len(scheduler_lrs) or lr != scheduler_lrs[index])
        ):
            raise found.error(f"{name}: group {index}'s lr {short(lr)} is not the scheduler's")
        parameters.update(zip(group["params"], live["params"], strict=True))
    ids_are_ints = all(isinstance(key, int) and not isinstance(key, bool) for key in parameters)
    if len(parameters) != sum(len(group["params"]) for group in groups) or not ids_are_ints:
        raise found.error(f"{name}: parameter ids are not distinct integers")
    if not isinstance(saved["state"], dict):
        raise found.error(f"{name}: its per-parameter state is not a mapping")
    for key, entry in saved["state"].items():
        if key not in parameters or not isinstance(entry, dict):
            raise found.error(f"{name}: state for unknown parameter {short(key)}")
        parameter = parameters[key]
        for field, value in entry.items():
            shaped = (value.shape, value.dtype) if isinstance(value, torch.Tensor) else None
            if shaped is not None and value.ndim and shaped != (parameter.shape, parameter.dtype):
                raise found.error(
                    f"{name}: {field} of parameter {key} is {tuple(value.shape)} {value.dtype}, "
                    f"the parameter {tuple(parameter.shape)} {parameter.dtype}"
                )
            if not isinstance(value, torch.Tensor | None) and not fmt.is_number(value):
                raise found.error(f"{name}: {field} of parameter {key} is {short(value)}")


def _check_group_settings(found: Checkpoint, saved: dict[str, Any], live: dict[str, Any], where: str) -> None:
    """Every setting of the live parameter group that the run fixes has the saved group's value.

    Not compared: :data:`_UNCHECKED_GROUP_KEYS`, and a setting that another torch version may not
    record (absent from the saved group) unless every version does. A cyclic scheduler (it adds
    ``max_momentum`` to the group) moves ``momentum`` and the first of ``betas``: their bounds
    are compared instead, and the rest of ``betas``.
    """
    cyclic = "max_momentum" in live
    for key, expected in live.items():
        if key in _UNCHECKED_GROUP_KEYS or (cyclic and key == "momentum"):
            continue
        if key not in saved and key not in _GROUP_SETTINGS + _CYCLE_SETTINGS:
            continue
        value = saved.get(key)
        same = (
            isinstance(value, list | tuple) and _same_setting(value[1:], expected[1:])
            if cyclic and key == "betas"
            else _same_setting(value, expected)
        )
        if not same:
            raise found.error(f"{where} has {key} {short(value)}, this run's {short(expected)}")


def _same_setting(saved: Any, live: Any) -> bool:
    """Whether a saved setting equals the live one: tuples and lists item by item, tensors by value."""
    if isinstance(saved, torch.Tensor) or isinstance(live, torch.Tensor):
        both = isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor)
        return both and saved.shape == live.shape and torch.equal(saved.cpu(), live.cpu())
    if isinstance(saved, list | tuple) and isinstance(live, list | tuple):
        return len(saved) == len(live) and all(_same_setting(a, b) for a, b in zip(saved, live, strict=True))
    return bool(saved == live)


def _check_rng_state(found: Checkpoint, state: Any, name: str, current: dict[str, Any]) -> None:
    """Raise unless :func:`restore_rng_state` would restore ``state`` here.

    The CPU generators are checked by restoring them, which runs every check they have,
    and putting the current states back; the CUDA ones by their device index and length,
    as restoring another device's state would start a CUDA context on it. ``current`` is
    this process's :func:`capture_rng_state`, put back after each check.
    """
    if not isinstance(state, dict) or not isinstance(state.get("cuda"), dict):
        raise found.error(f"{name} does not hold a repro.rng state")
    try:
        restore_rng_state({**state, "cuda": {}})
    except Exception as error:  # each generator rejects a bad state with its own exception type
        raise found.error(f"{name}: the RNG state cannot be restored ({first_line(error)})") from None
    finally:
        restore_rng_state(current)
    devices = torch.cuda.device_count()
    # Every device's generator state has the length of this process's device's (if it has one).
    reference = next(iter(current["cuda"].values()), None)
    for device, text in state["cuda"].items():
        if not device.isdigit() or int(device) >= devices:
            raise found.error(f"{name} holds an RNG state for CUDA device {short(device)}, which this machine lacks")
        if not isinstance(text, str) or (reference is not None and len(text) != len(reference)):
            raise found.error(f"{name}: the RNG state of CUDA device {device} is malformed")
