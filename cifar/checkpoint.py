"""Checkpoints that survive being killed anywhere, and load without running code.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding:

- ``model.safetensors``: the weights (safetensors: tensors only);
- ``optimizer.pt``: the optimizer's state, read back with
  ``torch.load(weights_only=True)``, which builds tensors and plain containers
  and refuses anything else;
- ``rank-R.json``: each process's RNG state (:mod:`repro.rng`) and its running
  loss sum, as JSON;
- ``state.json``: the format version, counters, the sampler's position, the
  scheduler's and gradient scaler's state, the metrics logged so far, the
  resolved config, the environment fingerprint and the SHA-256 of every other
  file.

It is written into a temporary folder and renamed into place once complete, so
a kill during the write leaves the previous checkpoints intact and at worst a
``.tmp-*`` folder, removed at the next start. The hashes in ``state.json``
detect a truncated or altered file before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "repro.checkpoint"
VERSION = 1
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another format: one line, exit status 2."""


@dataclass
class Checkpoint:
    """What :func:`load` returns: the folder and its parsed ``state.json``."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(self.path / "model.safetensors")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{self.path}: unreadable model.safetensors ({error})") from None

    def optimizer_state(self) -> dict[str, Any]:
        try:
            return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"{self.path}: optimizer.pt is not a plain tensor file and was not loaded ({first_line})"
            ) from None

    def rank_state(self, rank: int) -> dict[str, Any] | None:
        path = self.path / f"rank-{rank}.json"
        return json.loads(path.read_text()) if path.exists() else None


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


def staging_dir(run_dir: Path, step: int) -> Path:
    """The temporary folder every process writes its part of checkpoint ``step`` into."""
    return checkpoint_dir(run_dir) / f".tmp-{PREFIX}{step:08d}"


def write_rank_state(staging: Path, rank: int, data: dict[str, Any]) -> None:
    """Write this process's part (RNG state, running sums); every rank calls it."""
    path = staging / f"rank-{rank}.json"
    path.write_text(json.dumps(data))
    _fsync(path)


def write_main(
    staging: Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write the shared files, hash everything and rename the folder into place (main process only).

    Call it after every rank has written its part. Returns the final folder.
    """
    save_file(model_state, staging / "model.safetensors")
    torch.save(optimizer_state, staging / "optimizer.pt")
    files = sorted(p for p in staging.iterdir() if p.is_file())
    for path in files:
        _fsync(path)
    state = {"format": FORMAT, "version": VERSION, **state, "files": {p.name: _sha256(p) for p in files}}
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    _fsync(staging / "state.json")
    final = staging.parent / staging.name.removeprefix(".tmp-")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    _fsync(staging.parent)
    return final


def load(path: Path) -> Checkpoint:
    """Read and verify a checkpoint folder; raises :class:`CheckpointError` saying what is wrong."""
    state_file = path / "state.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no state.json (incomplete or not a checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')!r}; this code reads version {VERSION}"
        )
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its SHA-256 does not match state.json)")
    for name in ("model.safetensors", "optimizer.pt"):
        if name not in state.get("files", {}):
            raise CheckpointError(f"checkpoint {path} does not list {name}")
    return Checkpoint(path, state)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def remove_stale_staging(run_dir: Path) -> list[Path]:
    """Delete ``.tmp-*`` folders left by a run killed while writing; return them."""
    folder = checkpoint_dir(run_dir)
    stale = sorted(folder.glob(".tmp-*")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def find_resume_checkpoint(run_dir: Path, mode: str) -> tuple[Checkpoint | None, list[str]]:
    """Resolve ``--resume`` (``latest``, ``auto`` or a folder) to a verified checkpoint.

    Returns the checkpoint (``None`` when ``auto`` finds none) and the lines to
    tell the user: ``auto`` skips corrupt checkpoints, newest first, and says so.
    """
    if mode not in ("latest", "auto"):
        return load(Path(mode)), []
    candidates = list_checkpoints(run_dir)
    if not candidates:
        if mode == "latest":
            raise CheckpointError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return None, []
    if mode == "latest":
        return load(candidates[-1]), []
    notes = []
    for path in reversed(candidates):
        try:
            return load(path), notes
        except CheckpointError as error:
            notes.append(f"skipping {error}")
    notes.append("no intact checkpoint: starting from scratch")
    return None, notes


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the one with the best test accuracy."""
    checkpoints = list_checkpoints(run_dir)
    best, best_accuracy = None, -1.0
    for path in checkpoints:
        try:
            accuracy = json.loads((path / "state.json").read_text()).get("test_accuracy")
        except (OSError, json.JSONDecodeError):
            continue
        if accuracy is not None and accuracy > best_accuracy:
            best, best_accuracy = path, accuracy
    for path in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if path != best:
            shutil.rmtree(path)
