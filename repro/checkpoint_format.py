"""The on-disk checkpoint format (version 3) that :mod:`repro.checkpoint` writes and reads.

A checkpoint is a folder ``step-NNNNNNNN/`` in a checkpoints folder (the step in at
least 8 digits; folders are ordered by the step's value), holding:

- ``model.safetensors``: the weights (safetensors: tensors only), each shared
  tensor (tied weights) once;
- ``optimizer.pt``: the optimizer's state, the scheduler's state and any extra
  tensor groups, read back with ``torch.load(weights_only=True)``, which builds
  tensors and plain containers and refuses anything else;
- ``rank-R.json``: each process's RNG state (:mod:`repro.rng`) and its own
  progress values, as JSON;
- ``state.json``: the format version, the step, the sampler's state, the names
  of the tied weights (``tied``: each to the name it is stored under), the
  user's progress values, the SHA-256 of every other file, and the SHA-256 of
  its own content (``state_sha256``).

It is written into a temporary folder with a name of its own
(``.tmp-step-NNNNNNNN-<pid>-<random>``), every file fsynced, and renamed into
place once complete (:func:`publish`), so a kill during the write leaves the
previous checkpoints intact and at worst a ``.tmp-*`` folder, which
:func:`remove_stale_staging` deletes; two writers never share one. A step
written again replaces its checkpoint only once the new one is complete. :func:`load` checks what a folder holds
by itself (format, version, hashes, file list) before anyone reads its content.

A run that went back to an earlier step (``auto`` past damaged checkpoints, or a
path) moves the checkpoints of the course it left, the step it writes first and
later ones, into ``set-aside/`` as it writes that step (:func:`set_aside_from`):
they are kept, but no longer count as the newest, nor as the best.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from repro.files import RunFileError, first_line, parse_json, read_text
from repro.report import short

FORMAT = "repro.checkpoint"
VERSION = 3  # 2: state.json is hashed; 3: the scheduler's state is in optimizer.pt, tied weights are stored once
PREFIX = "step-"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
# state.json's keys that the format itself uses; the user's progress values take the others.
RESERVED_KEYS = frozenset({"format", "version", "step", "sampler", "scheduler", "tied", "files", "state_sha256"})
# optimizer.pt's keys that the optimizer's state uses; extra tensor groups take the others but SCHEDULER_KEY.
OPTIMIZER_KEYS = frozenset({"state", "param_groups"})
SCHEDULER_KEY = "scheduler"

_STEP = r"(?:\d{8}|[1-9]\d{8,})"  # folder_name's digits: 8 at least, no leading zero beyond them
_FOLDER_NAME = re.compile(rf"{PREFIX}({_STEP})")
# What a writer killed mid-checkpoint leaves: its staging folder, or the old folder of a step it
# rewrote (publish), named by the step's folder.
_STAGING_NAME = re.compile(rf"\.tmp-(replaced-)?({PREFIX}{_STEP})-\d+-[0-9a-f]{{8}}")
SET_ASIDE_DIR = "set-aside"
_SET_ASIDE_DIR_NAME = re.compile(re.escape(SET_ASIDE_DIR))
_SET_ASIDE_NAME = re.compile(rf"{PREFIX}{_STEP}(\.[1-9]\d*)?")  # a second one of a step gets .1, .2, ...
_RANK_FILE = re.compile(r"rank-(0|[1-9]\d*)\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, altered, of another format, that does not fit
    the run, or that cannot be written; its message is one line. ``auto`` skips one that fails."""


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def folder_name(step: int) -> str:
    """The folder of checkpoint ``step``; raises ``ValueError`` unless ``step`` is a count."""
    if not is_count(step):
        raise ValueError(f"step must be an int of 0 or more, got {short(step)} ({type(step).__name__})")
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    """The step of a checkpoint folder that :func:`list_checkpoints` lists."""
    return int(path.name.removeprefix(PREFIX))


def state_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of ``state`` without its ``state_sha256`` key, as canonical JSON (sorted keys,
    no spaces): what ``state.json`` records of itself. JSON floats read back exactly, so the
    hash of a loaded state equals the hash of the state that was written."""
    body = {key: value for key, value in state.items() if key != "state_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Checkpoint:
    """What :func:`load` returns: the folder and its verified ``state.json``. Its files
    match their hashes; their content is checked as they are read."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return self.state["step"]

    @property
    def ranks(self) -> list[int]:
        """The ranks whose files the checkpoint holds."""
        return _ranks(self.state["files"])

    def error(self, problem: str) -> CheckpointError:
        """A :class:`CheckpointError` naming this checkpoint: raise it when its content is wrong."""
        return CheckpointError(f"checkpoint {self.path}: {problem}")

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights, each tied name given the tensor of the name it is stored under."""
        try:
            tensors = load_safetensors((self.path / MODEL_FILE).read_bytes())
        except (SafetensorError, OSError) as error:
            raise self.error(f"unreadable {MODEL_FILE} ({first_line(error)})") from None
        for name, stored_as in self.state["tied"].items():
            if name in tensors or stored_as not in tensors:
                raise self.error(f"{STATE_FILE} ties {short(name)} to {short(stored_as)}, which {MODEL_FILE} lacks")
            tensors[name] = tensors[stored_as]
        return tensors

    def optimizer_file(self) -> dict[str, Any]:
        """``optimizer.pt``'s content, unpickled with ``weights_only=True``: no code runs."""
        try:
            data = (self.path / OPTIMIZER_FILE).read_bytes()
            content = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # whatever the unpickler refuses, it refuses as one of many types
            raise self.error(
                f"{OPTIMIZER_FILE} is not a plain tensor file and was not loaded ({first_line(error)})"
            ) from None
        if not isinstance(content, dict):
            raise self.error(f"{OPTIMIZER_FILE} does not hold an optimizer state")
        return content

    def scheduler_state(self) -> dict[str, Any] | None:
        """The scheduler's state that ``optimizer.pt`` holds, None if it holds none."""
        state = self.optimizer_file().get(SCHEDULER_KEY)
        if state is not None and not isinstance(state, dict):
            raise self.error(f"{OPTIMIZER_FILE}'s scheduler state is not a mapping")
        return state

    def rank_state(self, rank: int) -> dict[str, Any]:
        """``rank-R.json``: a mapping holding ``rng`` and the rank's progress values."""
        name = f"rank-{rank}.json"
        try:
            data = _read_json(self.path / name)
        except RunFileError as error:
            raise self.error(f"{name} is not readable JSON ({first_line(error)})") from None
        if not isinstance(data, dict) or "rng" not in data:
            raise self.error(f"{name} does not hold an RNG state")
        return data


def _read_json(file: Path) -> Any:
    """A checkpoint's JSON file, read as repro.files reads a run folder's: no link or special
    file (a state.json linked to /dev/zero would never end), within its size and shape bounds."""
    return parse_json(read_text(file), str(file))


def _ranks(names: Iterable[str]) -> list[int]:
    """The ranks of the ``rank-R.json`` files among ``names``, in order."""
    return sorted(int(match[1]) for name in names if (match := _RANK_FILE.fullmatch(name)))


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


def new_staging(directory: Path, step: int) -> Path:
    """Create the temporary folder that every process writes its part of checkpoint ``step``
    into (main process only; it hands the name to the others). The pid and a random suffix
    keep two writers of the same step apart."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".tmp-{folder_name(step)}-{os.getpid()}-{os.urandom(4).hex()}"
    staging.mkdir()
    return staging


def write_rank_state(staging: Path, rank: int, data: Mapping[str, Any]) -> None:
    """Write this process's part (RNG state, its progress values); every rank calls it."""
    _write(staging / f"rank-{rank}.json", json.dumps(data).encode())


def write_main(
    staging: Path, model_state: Mapping[str, torch.Tensor], optimizer_file: Mapping[str, Any], state: dict[str, Any]
) -> None:
    """Write the shared files and hash everything (main process only); :func:`publish` then
    puts the folder in place.

    Call it after every rank has written its part. ``state`` holds ``step``, ``tied`` and the
    other keys of ``state.json``. On a failure (a full disk) it removes the staging folder and
    raises ``OSError``: the previous checkpoints are untouched.
    """
    try:
        files = {path.name: _sha256(path) for path in sorted(staging.iterdir())}
        # Serialised in memory and written here, so a failing disk raises OSError, whatever the library.
        files[MODEL_FILE] = _write(staging / MODEL_FILE, save_safetensors(dict(model_state)))
        buffer = io.BytesIO()
        torch.save(dict(optimizer_file), buffer)
        files[OPTIMIZER_FILE] = _write(staging / OPTIMIZER_FILE, buffer.getvalue())
        state = {"format": FORMAT, "version": VERSION, **state, "files": dict(sorted(files.items()))}
        state["state_sha256"] = state_sha256(state)
        _write(staging / STATE_FILE, json.dumps(state, indent=1).encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, step: int) -> list[Path]:
    """Put the complete checkpoint ``staging`` in place as step ``step``; return the
    checkpoints it set aside (:func:`set_aside_from`).

    With a later checkpoint present the run went back, and the checkpoints of ``step`` and
    later are set aside. Otherwise a checkpoint of ``step`` (the newest, saved again) is
    replaced: moved to a ``.tmp-replaced-*`` name, the new one renamed in, the old one
    deleted. A kill between those two renames leaves the old one under that name, which
    :func:`remove_stale_staging` puts back. A link named like the checkpoint
    is removed, never followed. On a failure the staging folder is removed, the old
    checkpoint put back, and ``OSError`` raised.
    """
    directory = staging.parent
    final, replaced = directory / folder_name(step), None
    try:
        went_back = any(step_of(path) > step for path in list_checkpoints(directory))
        set_aside = set_aside_from(directory, step) if went_back else []
        if final.is_symlink():
            final.unlink()
        elif final.exists():
            replaced = directory / f".tmp-replaced-{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
            final.rename(replaced)
        staging.rename(final)
    except BaseException:
        if replaced is not None and not final.exists():
            replaced.rename(final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(directory)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return set_aside


def _read_state(path: Path) -> dict[str, Any]:
    """Parse ``state.json`` and check its format, version, self-hash and the format's own keys."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it is a file)")
    state_file = path / STATE_FILE
    if not state_file.exists() and not state_file.is_symlink():
        raise CheckpointError(
            f"{path} is not a checkpoint folder: it has no {STATE_FILE} (incomplete, or not a checkpoint)"
        )
    try:
        state = _read_json(state_file)
    except RunFileError as error:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} cannot be read ({first_line(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {short(state.get('version'))}; this code reads version "
            f"{VERSION} (resume it with the code that wrote it, or start the run again)"
        )
    if not is_sha256(state.get("state_sha256")) or state_sha256(state) != state["state_sha256"]:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is altered or corrupt (its SHA-256 does not match)")
    if not is_count(state.get("step")):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE}'s 'step' is not a count")
    files = state.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) and is_sha256(h) for name, h in files.items()):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE}'s 'files' is not a mapping of file names to SHA-256s")
    if "sampler" in state and not isinstance(state["sampler"], dict):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE}'s 'sampler' is not a mapping")
    tied = state.get("tied")
    if not isinstance(tied, dict) or not all(isinstance(value, str) for value in tied.values()):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE}'s 'tied' is not a mapping of names to names")
    return state


def _check_files(path: Path, files: dict[str, str]) -> None:
    """The folder holds exactly the files ``state.json`` lists, each with its recorded SHA-256."""
    names = set(files)
    ranks = _ranks(names)
    required = {MODEL_FILE, OPTIMIZER_FILE, "rank-0.json"}
    if not required <= names or ranks != list(range(len(ranks))):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} does not list the files of a checkpoint")
    odd = sorted(names - {MODEL_FILE, OPTIMIZER_FILE} - {f"rank-{rank}.json" for rank in ranks})
    if odd:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} lists unexpected files {short(odd)}")
    unlisted = sorted(entry.name for entry in path.iterdir() if entry.name not in names | {STATE_FILE})
    if unlisted:
        raise CheckpointError(f"checkpoint {path} holds {short(unlisted)}, which {STATE_FILE} does not list")
    for name, expected in files.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}, or it is not a plain file")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match {STATE_FILE})")


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint folder: format, version, hashes and file list.
    Raises :class:`CheckpointError` saying what is wrong."""
    state = _read_state(path)
    _check_files(path, state["files"])
    return Checkpoint(path, state)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint folders in ``directory``, oldest (lowest step) first. Links are left
    out: a checkpoint is a real folder this run wrote, and a link is neither resumed from nor pruned."""
    if not directory.is_dir():
        return []
    return sorted(
        (
            path
            for path in directory.iterdir()
            if _FOLDER_NAME.fullmatch(path.name) and not path.is_symlink() and path.is_dir()
        ),
        key=step_of,
    )


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete the ``.tmp-step-*`` folders left by a run killed while writing; return them.
    A ``.tmp-replaced-*`` checkpoint whose successor never came (killed between :func:`publish`'s
    two renames) is put back in place instead. Links, other names and folders that cannot be
    deleted are left alone: no run ever lists them."""
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = _STAGING_NAME.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        final = directory / match[2]
        try:
            if match[1] and not final.exists() and not final.is_symlink():
                path.rename(final)
                continue
            shutil.rmtree(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def resolve(directory: Path, mode: str, open_checkpoint: Callable[[Path], T]) -> tuple[T | None, list[str]]:
    """Resolve ``latest``, ``auto`` or a folder's path through ``open_checkpoint``, which
    loads and checks one folder and raises :class:`CheckpointError` if it cannot be used.

    Returns its result (``None`` when ``auto`` finds none) and the lines to tell the
    user: ``auto`` skips, newest first, every checkpoint that fails, and says so.
    """
    if mode not in ("latest", "auto"):
        return open_checkpoint(Path(mode)), []
    candidates = list_checkpoints(directory)
    if not candidates:
        if mode == "latest":
            raise CheckpointError(f"no checkpoint in {directory}: 'latest' needs one ('auto' starts from scratch)")
        return None, []
    if mode == "latest":
        return open_checkpoint(candidates[-1]), []
    notes = []
    for path in reversed(candidates):
        try:
            return open_checkpoint(path), notes
        except CheckpointError as error:
            notes.append(f"skipping {error}")
    notes.append("no intact checkpoint left")  # the caller says what it does then: start afresh, or refuse
    return None, notes


def _recorded(path: Path, key: str) -> float | None:
    """The number a checkpoint's ``state.json`` records under ``key``, if readable."""
    try:
        value = _read_json(path / STATE_FILE).get(key)
    except (RunFileError, AttributeError):
        return None
    return value if is_number(value) else None


def set_aside_from(directory: Path, step: int) -> list[Path]:
    """Move the checkpoints of step ``step`` and later into ``directory/set-aside/``; return
    where each went.

    When: as checkpoint ``step`` is put in place (:func:`publish`), once it is complete, if
    a later one exists. A run that writes ``step`` while later checkpoints exist went on
    from an earlier one, so they belong to a course it left (``auto`` refused them, or a
    path named an earlier one): left in place, they would count as the newest, and
    pruning would delete what the run writes now.
    """
    later = [path for path in list_checkpoints(directory) if step_of(path) >= step]
    if not later:
        return []
    aside = directory / SET_ASIDE_DIR
    aside.mkdir(exist_ok=True)
    moved = []
    for path in later:
        target, copy = aside / path.name, 0
        while target.exists() or target.is_symlink():
            copy += 1
            target = aside / f"{path.name}.{copy}"
        path.rename(target)
        moved.append(target)
    _fsync(directory)
    return moved


def unknown_entry(directory: Path) -> Path | None:
    """The first entry of the checkpoints folder ``directory`` that this format does not
    write (by name and kind), or None: checkpoints, staging folders, ``set-aside/`` and
    what it holds. A link with such a name is known: whoever clears the folder removes the
    link, never what it points to."""
    for entry in sorted(directory.iterdir()):
        if entry.name == SET_ASIDE_DIR and entry.is_dir() and not entry.is_symlink():
            inner = next((path for path in sorted(entry.iterdir()) if not _is_folder(path, _SET_ASIDE_NAME)), None)
            if inner is not None:
                return inner
        elif not _is_folder(entry, _FOLDER_NAME, _STAGING_NAME, _SET_ASIDE_DIR_NAME):
            return entry
    return None


def _is_folder(path: Path, *names: re.Pattern[str]) -> bool:
    """Whether ``path`` is a folder, or a link, with a name that one of ``names`` matches."""
    return any(name.fullmatch(path.name) for name in names) and (path.is_symlink() or path.is_dir())


def prune(directory: Path, keep: int, best_key: str | None = None) -> None:
    """Keep the newest ``keep`` checkpoints and, with ``best_key``, the one whose
    ``state.json`` records the highest number under that key."""
    checkpoints = list_checkpoints(directory)
    best, best_value = None, None
    for path in checkpoints if best_key is not None else []:
        value = _recorded(path, best_key)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = path, value
    for path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if path != best:
            shutil.rmtree(path)
