"""Checkpoints that survive being killed anywhere, load without running code, and
are refused, never half-applied, when damaged or altered.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding:

- ``model.safetensors``: the weights (safetensors: tensors only);
- ``optimizer.pt``: the optimizer's state, read back with
  ``torch.load(weights_only=True)``, which builds tensors and plain containers
  and refuses anything else;
- ``rank-R.json``: each process's RNG state (:mod:`repro.rng`) and its running
  loss sum, as JSON;
- ``state.json``: the format version, counters, the sampler's position, the
  scheduler's and gradient scaler's state, the metrics logged so far, the
  resolved config, the environment and dataset fingerprints, the SHA-256 of
  every other file, and the SHA-256 of its own content (``state_sha256``).

It is written into a temporary folder with a name of its own
(``.tmp-step-NNNNNNNN-<pid>-<random>``) and renamed into place once complete,
so a kill during the write leaves the previous checkpoints intact and at worst
a ``.tmp-*`` folder, removed at the next start; two writers never share one.

Loading checks, before anything is applied to the run: the hashes (a truncated
or altered file, ``state.json`` included), the schema of ``state.json`` (every
key, of the right type, and no other), that the folder holds exactly the files
it lists, that the redundant counters agree (step, epoch, position, sampler,
scheduler, epoch records), and that the weights, optimizer groups and RNG
states fit the resuming run. So ``--resume auto`` can fall back past any
checkpoint that fails, and ``latest`` or a path fail with one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from repro.rng import capture_rng_state, restore_rng_state

FORMAT = "repro.checkpoint"
VERSION = 2  # 2: state.json is hashed and records the dataset fingerprint
PREFIX = "step-"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LOOKAHEAD_KEY = "lookahead"  # optimizer.pt's entry for the lookahead's slow weights, when the run has them

_FOLDER_NAME = re.compile(rf"{PREFIX}\d{{8}}")
_RANK_FILE = re.compile(r"rank-(0|[1-9]\d*)\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, altered, of another format, or that cannot be
    written: one line, exit status 2. ``--resume auto`` falls back past one that fails to load."""


class _ContentError(Exception):
    """A problem found in a checkpoint's content; :class:`Checkpoint` adds the folder's name."""


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: a hostile file must not make a huge error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


# What every completed epoch's record must hold (train.py adds timing fields besides).
RECORD_KEYS = {
    "epoch": _is_count,
    "step": _is_count,
    "train_loss": _is_number,
    "test_loss": _is_number,
    "test_accuracy": _is_number,
    "test_images": _is_count,
    "lr": _is_number,
}


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and all(key in value and check(value[key]) for key, check in RECORD_KEYS.items())


def _is_file_list(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(name, str) and _is_sha256(h) for name, h in value.items())


# state.json's keys besides format and version: (check, what the value must be).
STATE_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "step": (_is_count, "a count"),
    "epoch": (_is_count, "a count"),
    "position": (_is_count, "a count"),
    "records": (lambda v: isinstance(v, list) and all(map(_is_record, v)), "a list of epoch records"),
    "test_accuracy": (lambda v: v is None or _is_number(v), "a number or null"),
    "sampler": (lambda v: isinstance(v, dict), "a mapping"),
    "scheduler": (lambda v: isinstance(v, dict), "a mapping"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "environment": (lambda v: isinstance(v, dict), "a mapping"),
    "dataset_sha256": (_is_sha256, "a SHA-256"),
    "files": (_is_file_list, "a mapping of file names to SHA-256s"),
    "state_sha256": (_is_sha256, "a SHA-256"),
}


def state_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of ``state`` without its ``state_sha256`` key, as canonical JSON (sorted keys,
    no spaces): what ``state.json`` records of itself. JSON floats read back exactly, so the
    hash of a loaded state equals the hash of the state that was written."""
    body = {key: value for key, value in state.items() if key != "state_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Target:
    """The resuming run, as a checkpoint must fit it: checked before anything is applied."""

    steps_per_epoch: int  # global batches per epoch: len(sampler)
    model_state: Mapping[str, torch.Tensor]  # the model's own state_dict: names, shapes, dtypes
    optimizer: torch.optim.Optimizer
    scheduler_state: dict[str, Any]  # the run's own scheduler.state_dict()
    sampler_state: dict[str, Any]  # the run's own sampler.state_dict(0)
    scaler_state: dict[str, Any] | None
    rank: int
    lookahead_state: Mapping[str, torch.Tensor] | None = None  # the run's slow weights, if it has lookahead


@dataclass(frozen=True)
class Contents:
    """A checkpoint read in full and checked against the resuming run: nothing left to fail."""

    checkpoint: Checkpoint
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rank_state: dict[str, Any] | None  # None: the checkpoint has no file for this rank
    lookahead_state: dict[str, torch.Tensor] | None = None


@dataclass
class Checkpoint:
    """What :func:`load` returns: the folder and its verified ``state.json``."""

    path: Path
    state: dict[str, Any]

    @property
    def ranks(self) -> list[int]:
        """The ranks whose files the checkpoint holds."""
        return sorted(int(match[1]) for name in self.state["files"] if (match := _RANK_FILE.fullmatch(name)))

    def read(self, target: Target) -> Contents:
        """Read the weights, optimizer state and RNG states and check them, and the
        counters, against ``target``; raise :class:`CheckpointError` at the first misfit.

        Nothing is applied: the run's model, optimizer and generators are as they were,
        so ``--resume auto`` can go on to an older checkpoint. Every rank checks every
        rank's RNG state, so all ranks accept or refuse the same checkpoints.
        """
        try:
            _check_counters(self.state, target)
            model_state = self._model_state()
            _check_model_state(model_state, target.model_state)
            optimizer_state = self._optimizer_state()
            # The lookahead's slow weights travel in the optimizer's file, beside its state.
            lookahead_state = optimizer_state.pop(LOOKAHEAD_KEY, None) if isinstance(optimizer_state, dict) else None
            _check_optimizer_state(optimizer_state, target.optimizer, self.state["scheduler"]["_last_lr"])
            _check_lookahead_state(lookahead_state, target.lookahead_state)
            rank_states = {rank: self._rank_state(rank) for rank in self.ranks}
        except _ContentError as problem:
            raise CheckpointError(f"checkpoint {self.path}: {problem}") from None
        return Contents(self, model_state, optimizer_state, rank_states.get(target.rank), lookahead_state)

    def _model_state(self) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors((self.path / MODEL_FILE).read_bytes())
        except (SafetensorError, OSError) as error:
            raise _ContentError(f"unreadable {MODEL_FILE} ({_first_line(error)})") from None

    def _optimizer_state(self) -> Any:
        try:
            data = (self.path / OPTIMIZER_FILE).read_bytes()
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # whatever the unpickler refuses, it refuses as one of many types
            raise _ContentError(
                f"{OPTIMIZER_FILE} is not a plain tensor file and was not loaded ({_first_line(error)})"
            ) from None

    def _rank_state(self, rank: int) -> dict[str, Any]:
        name = f"rank-{rank}.json"
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as error:
            raise _ContentError(f"{name} is not readable JSON ({_first_line(error)})") from None
        if not isinstance(data, dict) or set(data) != {"rng", "loss_sum"} or not _is_number(data["loss_sum"]):
            raise _ContentError(f"{name} does not hold an RNG state and a loss sum")
        _check_rng_state(data["rng"], name)
        return data


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return _short(text.splitlines()[0], 200) if text else type(error).__name__


def _check_counters(state: dict[str, Any], target: Target) -> None:
    """The redundant fields must agree with each other and with the run's step count per epoch."""
    per_epoch, epoch, position, step = target.steps_per_epoch, state["epoch"], state["position"], state["step"]
    if position >= per_epoch:
        raise _ContentError(f"position {position} is past the {per_epoch} batches of an epoch")
    if step != epoch * per_epoch + position:
        raise _ContentError(f"step {step} is not epoch {epoch} x {per_epoch} steps + position {position}")
    records = state["records"]
    if len(records) != epoch:
        raise _ContentError(f"it holds {len(records)} epoch records for {epoch} completed epochs")
    for number, record in enumerate(records, 1):
        if record["epoch"] != number or record["step"] != number * per_epoch:
            raise _ContentError(f"epoch record {number} says epoch {record['epoch']}, step {record['step']}")
    expected_accuracy = records[-1]["test_accuracy"] if records and position == 0 else None
    if state["test_accuracy"] != expected_accuracy:
        raise _ContentError(f"test_accuracy {_short(state['test_accuracy'])} is not the last epoch's")
    sampler = state["sampler"]
    _check_structure(sampler, target.sampler_state, "sampler")
    for key in ("version", "num_samples", "batch_size", "seed"):
        if sampler[key] != target.sampler_state[key]:
            raise _ContentError(f"sampler {key} {sampler[key]} differs from this run's {target.sampler_state[key]}")
    # At an epoch's end the sampler still names the epoch just finished, at position 0.
    if sampler["position"] != position or sampler["epoch"] != (epoch if position else epoch - 1):
        raise _ContentError(
            f"sampler epoch {sampler['epoch']}, position {sampler['position']} disagree with "
            f"epoch {epoch}, position {position}"
        )
    scheduler = state["scheduler"]
    for key in ("last_epoch", "base_lrs", "_last_lr"):
        if key not in scheduler:
            raise _ContentError(f"scheduler state lacks {key!r}")
    # Only the keys both hold: another torch version may add or drop some.
    common = set(scheduler) & set(target.scheduler_state)
    _check_structure({k: scheduler[k] for k in common}, {k: target.scheduler_state[k] for k in common}, "scheduler")
    if scheduler["last_epoch"] != step:
        raise _ContentError(f"scheduler last_epoch {scheduler['last_epoch']} is not step {step}")
    if scheduler["base_lrs"] != target.scheduler_state["base_lrs"]:
        raise _ContentError(
            f"scheduler base_lrs {_short(scheduler['base_lrs'])} differ from this run's "
            f"{_short(target.scheduler_state['base_lrs'])}"
        )
    if state["scaler"] is not None and target.scaler_state is not None:
        common = set(state["scaler"]) & set(target.scaler_state)
        _check_structure({k: state["scaler"][k] for k in common}, {k: target.scaler_state[k] for k in common}, "scaler")


def _check_structure(saved: Any, reference: Any, where: str) -> None:
    """``saved`` must have the shape of ``reference``: the same keys, list lengths and value types."""
    if isinstance(reference, dict):
        if not isinstance(saved, dict):
            raise _ContentError(f"{where} is not a mapping")
        if set(saved) != set(reference):
            extra, missing = sorted(map(str, set(saved) - set(reference))), sorted(set(reference) - set(saved))
            raise _ContentError(f"{where} has keys {_short(extra)} it should not, lacks {_short(missing)}")
        for key in reference:
            _check_structure(saved[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        if not isinstance(saved, list) or len(saved) != len(reference):
            raise _ContentError(f"{where} is not a list of {len(reference)}")
        for index, (item, expected) in enumerate(zip(saved, reference, strict=True)):
            _check_structure(item, expected, f"{where}[{index}]")
    elif type(saved) is not type(reference):
        raise _ContentError(f"{where} is {_short(saved)}, not a {type(reference).__name__}")


def _check_model_state(
    saved: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], where: str = MODEL_FILE
) -> None:
    """The same tensors as the model's, of the same shapes and dtypes."""
    missing, extra = sorted(set(model) - set(saved)), sorted(set(saved) - set(model))
    if missing or extra:
        raise _ContentError(f"{where} lacks {_short(missing)} and has {_short(extra)} beyond this model's")
    for name, tensor in saved.items():
        expected = model[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            found = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else _short(tensor)
            raise _ContentError(f"{where}: {name} is {found}, this model's is {tuple(expected.shape)} {expected.dtype}")


def _check_lookahead_state(saved: Any, run: Mapping[str, torch.Tensor] | None) -> None:
    """Slow weights exactly when the run has lookahead, shaped like the run's."""
    where = f"{OPTIMIZER_FILE}'s {LOOKAHEAD_KEY}"
    if run is None or saved is None:
        if run is not None or saved is not None:
            raise _ContentError(f"{where}: {'missing' if saved is None else 'present'}, unlike this run's")
        return
    if not isinstance(saved, dict):
        raise _ContentError(f"{where} is not a mapping of tensors")
    _check_model_state(saved, run, where)


# Optimizer settings that the config fixes: load_state_dict would otherwise take the file's.
_GROUP_SETTINGS = ("momentum", "dampening", "nesterov", "weight_decay", "initial_lr")


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, scheduler_lrs: list[Any]) -> None:
    """The same parameter groups as ``optimizer``'s, with the same sizes and settings, each
    group's learning rate the scheduler's, and per-parameter state shaped like its parameter."""
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise _ContentError(f"{OPTIMIZER_FILE} does not hold an optimizer state")
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        count = len(groups) if isinstance(groups, list) else _short(groups)
        raise _ContentError(f"{OPTIMIZER_FILE} has {count} parameter groups, this run's optimizer {len(live_groups)}")
    parameters: dict[Any, torch.Tensor] = {}
    for index, (group, live) in enumerate(zip(groups, live_groups, strict=True)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise _ContentError(f"{OPTIMIZER_FILE}: parameter group {index} is malformed")
        if len(group["params"]) != len(live["params"]):
            raise _ContentError(
                f"{OPTIMIZER_FILE}: parameter group {index} has {len(group['params'])} parameters, "
                f"this run's {len(live['params'])}"
            )
        for key in _GROUP_SETTINGS:
            if key in live and group.get(key) != live[key]:
                raise _ContentError(
                    f"{OPTIMIZER_FILE}: group {index} has {key} {_short(group.get(key))}, this run's {live[key]!r}"
                )
        if not _is_number(group.get("lr")) or index >= len(scheduler_lrs) or group["lr"] != scheduler_lrs[index]:
            raise _ContentError(
                f"{OPTIMIZER_FILE}: group {index}'s lr {_short(group.get('lr'))} is not the scheduler's"
            )
        parameters.update(zip(group["params"], live["params"], strict=True))
    if len(parameters) != sum(len(group["params"]) for group in groups) or not all(map(_is_int, parameters)):
        raise _ContentError(f"{OPTIMIZER_FILE}: parameter ids are not distinct integers")
    if not isinstance(saved["state"], dict):
        raise _ContentError(f"{OPTIMIZER_FILE}: its per-parameter state is not a mapping")
    for key, entry in saved["state"].items():
        if key not in parameters or not isinstance(entry, dict):
            raise _ContentError(f"{OPTIMIZER_FILE}: state for unknown parameter {_short(key)}")
        parameter = parameters[key]
        for name, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and value.ndim
                and (value.shape, value.dtype)
                != (
                    parameter.shape,
                    parameter.dtype,
                )
            ):
                raise _ContentError(
                    f"{OPTIMIZER_FILE}: {name} of parameter {key} is {tuple(value.shape)} {value.dtype}, "
                    f"the parameter {tuple(parameter.shape)} {parameter.dtype}"
                )
            if not isinstance(value, torch.Tensor | None) and not _is_number(value):
                raise _ContentError(f"{OPTIMIZER_FILE}: {name} of parameter {key} is {_short(value)}")


def _check_rng_state(state: Any, name: str) -> None:
    """Raise :class:`_ContentError` unless :func:`restore_rng_state` would restore ``state`` here.

    The CPU generators are checked by restoring them, which runs every check they have,
    and putting the current states back; the CUDA ones by their device index and length,
    as restoring another device's state would start a CUDA context on it.
    """
    if not isinstance(state, dict) or not isinstance(state.get("cuda"), dict):
        raise _ContentError(f"{name} does not hold a repro.rng state")
    current = capture_rng_state()
    try:
        restore_rng_state({**state, "cuda": {}})
    except Exception as error:  # each generator rejects a bad state with its own exception type
        raise _ContentError(f"{name}: the RNG state cannot be restored ({_first_line(error)})") from None
    finally:
        restore_rng_state(current)
    devices = torch.cuda.device_count()
    # Every device's generator state has the length of this process's device's (if it has one).
    reference = next(iter(current["cuda"].values()), None)
    for device, text in state["cuda"].items():
        if not device.isdigit() or int(device) >= devices:
            raise _ContentError(f"{name} holds an RNG state for CUDA device {_short(device)}, which this machine lacks")
        if not isinstance(text, str) or (reference is not None and len(text) != len(reference)):
            raise _ContentError(f"{name}: the RNG state of CUDA device {device} is malformed")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and to the disk; return its SHA-256."""
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    return hashlib.sha256(data).hexdigest()


def new_staging(run_dir: Path, step: int) -> Path:
    """Create the temporary folder that every process writes its part of checkpoint ``step`` into
    (main process only; it hands the name to the others). The pid and a random suffix keep two
    writers of the same step apart."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".tmp-{PREFIX}{step:08d}-{os.getpid()}-{os.urandom(4).hex()}"
    staging.mkdir()
    return staging


def write_failure(run_dir: Path, step: int, error: OSError) -> str:
    """The one line that says a checkpoint could not be written, and that nothing was lost."""
    final = checkpoint_dir(run_dir) / f"{PREFIX}{step:08d}"
    return f"cannot write checkpoint {final}: {error}; the checkpoints written before it are intact"


def write_rank_state(staging: Path, rank: int, data: dict[str, Any]) -> None:
    """Write this process's part (RNG state, running sums); every rank calls it."""
    _write(staging / f"rank-{rank}.json", json.dumps(data).encode())


def write_main(
    staging: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write the shared files, hash everything and rename the folder into place (main process only).

    Call it after every rank has written its part. Returns the final folder. On a
    failure (a full disk) it removes the staging folder and raises ``OSError``: the
    previous checkpoints are untouched.
    """
    final = staging.parent / f"{PREFIX}{state['step']:08d}"
    try:
        files = {path.name: _sha256(path) for path in sorted(staging.iterdir())}
        # Serialised in memory and written here, so a failing disk raises OSError, whatever the library.
        files[MODEL_FILE] = _write(staging / MODEL_FILE, save_safetensors(model_state))
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        files[OPTIMIZER_FILE] = _write(staging / OPTIMIZER_FILE, buffer.getvalue())
        state = {"format": FORMAT, "version": VERSION, **state, "files": dict(sorted(files.items()))}
        state["state_sha256"] = state_sha256(state)
        _write(staging / STATE_FILE, json.dumps(state, indent=1).encode())
        _replace(final, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(staging.parent)
    return final


def _replace(final: Path, staging: Path) -> None:
    """Rename ``staging`` to ``final``. A folder already there (a step rewritten after an
    earlier resume) is first renamed aside under a ``.tmp-`` name and deleted after, so a
    kill in between leaves it for the next start to remove; a link there is removed, never
    followed."""
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        aside = final.parent / f".tmp-replaced-{staging.name.removeprefix('.tmp-')}"
        final.rename(aside)
        staging.rename(final)
        shutil.rmtree(aside, ignore_errors=True)  # what is left, the next start removes
        return
    staging.rename(final)


def _read_state(path: Path) -> dict[str, Any]:
    """Parse ``state.json`` and check its format, version, self-hash and schema."""
    state_file = path / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it is a file)")
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a checkpoint folder: it has no {STATE_FILE} (incomplete, or not a checkpoint)"
        ) from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE} ({error})") from None
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is corrupt ({_first_line(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {_short(state.get('version'))}; this code reads version "
            f"{VERSION} (resume it with the code that wrote it, or start the run again)"
        )
    if not _is_sha256(state.get("state_sha256")) or state_sha256(state) != state["state_sha256"]:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is altered or corrupt (its SHA-256 does not match)")
    unknown = sorted(set(state) - set(STATE_SCHEMA) - {"format", "version"})
    if unknown:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has unknown keys {_short(unknown)}")
    for key, (check, description) in STATE_SCHEMA.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lacks {key!r}")
        if not check(state[key]):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE}'s {key!r} is not {description}")
    return state


def _check_files(path: Path, files: dict[str, str]) -> None:
    """The folder holds exactly the files ``state.json`` lists, each with its recorded SHA-256."""
    names = set(files)
    ranks = sorted(int(match[1]) for name in names if (match := _RANK_FILE.fullmatch(name)))
    required = {MODEL_FILE, OPTIMIZER_FILE, "rank-0.json"}
    if not required <= names or ranks != list(range(len(ranks))):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not list the files of a checkpoint")
    odd = sorted(names - {MODEL_FILE, OPTIMIZER_FILE} - {f"rank-{rank}.json" for rank in ranks})
    if odd:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lists unexpected files {_short(odd)}")
    unlisted = sorted(entry.name for entry in path.iterdir() if entry.name not in names | {STATE_FILE})
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds {_short(unlisted)}, which {STATE_FILE} does not list")
    for name, expected in files.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}, or it is not a plain file")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match {STATE_FILE})")


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint folder; raises :class:`CheckpointError` saying what is wrong.

    Checks what the folder holds by itself (format, hashes, schema, file list);
    :meth:`Checkpoint.read` then checks it against the resuming run.
    """
    state = _read_state(path)
    _check_files(path, state["files"])
    return Checkpoint(path, state)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first. Links are left out: a checkpoint
    is a real folder this run wrote, and a link is neither resumed from nor pruned."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if _FOLDER_NAME.fullmatch(path.name) and not path.is_symlink() and path.is_dir()
    )


def remove_stale_staging(run_dir: Path) -> list[Path]:
    """Delete the ``.tmp-*`` folders left by a run killed while writing; return them.
    Links and folders that cannot be deleted are left alone: no run ever lists them."""
    folder = checkpoint_dir(run_dir)
    removed = []
    for path in sorted(folder.glob(".tmp-*")) if folder.is_dir() else []:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            shutil.rmtree(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def find_resume_checkpoint(
    run_dir: Path, mode: str, open_checkpoint: Callable[[Path], T]
) -> tuple[T | None, list[str]]:
    """Resolve ``--resume`` (``latest``, ``auto`` or a folder) through ``open_checkpoint``,
    which loads and checks one folder and raises :class:`CheckpointError` if it cannot be used.

    Returns its result (``None`` when ``auto`` finds none) and the lines to tell
    the user: ``auto`` skips, newest first, every checkpoint that fails, and says so.
    """
    if mode not in ("latest", "auto"):
        return open_checkpoint(Path(mode)), []
    candidates = list_checkpoints(run_dir)
    if not candidates:
        if mode == "latest":
            raise CheckpointError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return None, []
    if mode == "latest":
        return open_checkpoint(candidates[-1]), []
    notes = []
    for path in reversed(candidates):
        try:
            return open_checkpoint(path), notes
        except CheckpointError as error:
            notes.append(f"skipping {error}")
    notes.append("no intact checkpoint: starting from scratch")
    return None, notes


def _recorded_accuracy(path: Path) -> float | None:
    """The test accuracy a checkpoint's ``state.json`` records, if it is readable and a number."""
    try:
        accuracy = json.loads((path / STATE_FILE).read_text()).get("test_accuracy")
    except (OSError, UnicodeDecodeError, RecursionError, AttributeError, json.JSONDecodeError):
        return None
    return accuracy if _is_number(accuracy) else None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the one with the best test accuracy."""
    checkpoints = list_checkpoints(run_dir)
    best, best_accuracy = None, -1.0
    for path in checkpoints:
        accuracy = _recorded_accuracy(path)
        if accuracy is not None and accuracy > best_accuracy:
            best, best_accuracy = path, accuracy
    for path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if path != best:
            shutil.rmtree(path)
