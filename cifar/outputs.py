"""The run folder: resolved config, metrics, manifest and final weights.

Files are written to a temporary name and renamed into place, so a crash never
leaves a half-written file behind a valid name.

A folder is a run folder only if this project's code wrote it: it holds the
marker ``.repro-run`` (written first into every folder a run claims), a
manifest or a checkpoint of this project's formats. Only a run folder may be
written again, and ``--overwrite`` deletes only the entries such a folder holds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as serialize_tensors

from cifar.config import (
    RUN_CONTROL_KEYS,
    ConfigError,
    TrainConfig,
    coerce,
    config_differences,
    config_to_dict,
    given_values,
    load_yaml,
    validate,
)
from cifar.runlock import LOCK_NAME, RunFolderInUseError, lock_run_dir
from cifar.tracking import TENSORBOARD_DIR
from repro import checkpoint_format
from repro.files import write_atomic
from repro.manifest import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CURVES_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    METRICS_FILE,
    WEIGHTS_FILE,
)

MARKER_NAME = ".repro-run"
RUN_FORMAT = "repro.run"

# What a run folder holds: the files and folders train.py and accelerate's
# tensorboard tracker write into it, and nothing else.
RUN_FILES = frozenset({CONFIG_FILE, METRICS_FILE, MANIFEST_FILE, WEIGHTS_FILE, CURVES_FILE, MARKER_NAME, LOCK_NAME})
TENSORBOARD_PREFIX = "events.out.tfevents."  # the names of the event files in TENSORBOARD_DIR
RUN_FOLDERS = frozenset({CHECKPOINTS_DIR, TENSORBOARD_DIR})  # checkpoint_format says what the first holds
# write_atomic's temporary files, left behind by a run killed while writing one.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8,12}")

# Keys that say what one invocation does, not what the run is: a resumed run
# does not take them from its saved config.
INVOCATION_KEYS = frozenset({"output_dir", "overwrite", "resume", "max_steps"})

# More than any manifest or checkpoint state.json this project writes.
_MAX_FORMAT_FILE_BYTES = 16 << 20


class RunFolderError(ConfigError):
    """A run folder this run may not use as asked: one line, exit status 2 (a ConfigError to train.py)."""


def default_output_dir(config: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-seed<seed>``: deterministic, so a rerun finds its folder."""
    return Path("runs") / f"{config.dataset}-{config.model}-seed{config.seed}"


def run_dir_of(config: TrainConfig) -> Path:
    """The run folder: ``--output-dir``, else :func:`default_output_dir`."""
    return Path(config.output_dir) if config.output_dir else default_output_dir(config)


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """The run's config: the command line's, over the run's saved ``config.yaml`` when resuming.

    A resumed run is the run that was started, so ``--resume latest --output-dir
    X`` alone continues it with the settings it began with; ``--resume PATH
    --output-dir NEW``, into a folder without a ``config.yaml``, takes them from
    the checkpoint's ``state.json`` and continues its run into NEW. Values given
    (flags, and the keys of a ``--config`` file) override the saved ones only for
    run-control keys; any other value that differs would make a different run
    and is refused. ``--overwrite`` with ``--resume`` is refused too: the one
    deletes what the other would continue.
    """
    given = given_values(argv)
    config = TrainConfig(**given)
    if config.resume is None:
        return validate(config)
    if config.overwrite:
        raise ConfigError("--overwrite deletes the run that --resume would continue: give one or the other")
    config_file = run_dir_of(config) / CONFIG_FILE
    if _exists(config_file) and config_file.is_file():
        source, raw = f"in {config_file.parent}", load_yaml(config_file)
    elif config.resume not in ("latest", "auto"):
        config_file = Path(config.resume) / checkpoint_format.STATE_FILE
        source, raw = f"of checkpoint {config.resume}", _checkpoint_config(Path(config.resume))
    else:
        return validate(config)
    try:
        saved = {str(key): coerce(str(key), value) for key, value in raw.items()}
    except ConfigError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    saved = {key: value for key, value in saved.items() if key not in INVOCATION_KEYS}
    changed = [
        f"{key}: {saved[key]!r} -> {value!r}"
        for key, value in given.items()
        if key in saved and key not in RUN_CONTROL_KEYS and value != saved[key]
    ]
    if changed:
        raise ConfigError(
            f"--resume continues the run {source} as it was started, but these settings differ "
            f"({'; '.join(changed)}); leave them out, or start a new run in another --output-dir"
        )
    return validate(TrainConfig(**{**saved, **given}))


def _checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The resolved config that train.py saved in ``checkpoint``'s ``state.json``, as read (values unchecked).

    The folder is verified first (format, version, hashes: :func:`repro.checkpoint_format.load`);
    raises its :class:`~repro.checkpoint_format.CheckpointError`, one line, for one that is not
    a checkpoint of this project's, or is damaged.
    """
    found = checkpoint_format.load(checkpoint)
    config = found.state.get("config")
    if not isinstance(config, dict):
        raise found.error(f"{checkpoint_format.STATE_FILE} records no config: it is not a checkpoint of train.py's")
    return config


def _exists(path: Path) -> bool:
    """``path.exists()``, but a path the system refuses to look up (a name too long, a file
    where a folder should be) is a one-line :class:`RunFolderError`, not a traceback."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as error:
        raise RunFolderError(f"output path {path}: {error.strerror}") from None
    return True


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds this project's marker, manifest or a checkpoint of its format."""
    return (
        _format_of(folder / MARKER_NAME) == RUN_FORMAT
        or _format_of(folder / MANIFEST_FILE) == MANIFEST_FORMAT
        or any(
            _format_of(path / checkpoint_format.STATE_FILE) == checkpoint_format.FORMAT
            for path in checkpoint_format.list_checkpoints(folder / CHECKPOINTS_DIR)
        )
    )


def _format_of(path: Path) -> str | None:
    """The ``format`` field of the JSON object in ``path``; None for anything else."""
    try:
        with path.open("rb") as file:
            data = json.loads(file.read(_MAX_FORMAT_FILE_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def unknown_entry(run_dir: Path) -> Path | None:
    """The first entry of ``run_dir``, or of its ``checkpoints`` and ``tensorboard``
    folders, that a run folder does not hold (by name and kind); None if all are known."""
    for entry in sorted(run_dir.iterdir()):
        stray = _stray(entry)
        if stray is not None:
            return stray
    return None


def _stray(entry: Path) -> Path | None:
    """``entry`` itself, or an entry inside it, if a run folder does not hold it; None if it does.

    A link with a run folder's name is known: ``--overwrite`` removes the link,
    never what it points to (a checkpoints folder on another disk, say).
    """
    temporary = _TEMPORARY.fullmatch(entry.name)
    if entry.name in RUN_FILES or (temporary and temporary["name"] in RUN_FILES):
        return None if entry.is_symlink() or entry.is_file() else entry
    if entry.name in RUN_FOLDERS:
        if entry.is_symlink():
            return None
        if not entry.is_dir():
            return entry
        if entry.name == CHECKPOINTS_DIR:
            return checkpoint_format.unknown_entry(entry)
        return next((inner for inner in sorted(entry.iterdir()) if not inner.name.startswith(TENSORBOARD_PREFIX)), None)
    return entry


def _image_folder_split_holding(output_dir: Path, config: TrainConfig) -> Path | None:
    """The ``train`` or ``test`` folder of ``--dataset imagefolder`` that ``output_dir`` lies in, if any:
    a run folder there would become a class of the data set, for this run and every later one."""
    if config.dataset != "imagefolder":
        return None
    try:
        output = output_dir.resolve()
        splits = [(Path(config.data_dir) / split).resolve() for split in ("train", "test")]
    except (OSError, RuntimeError):  # a path the system cannot look up: check_output_dir says so
        return None
    return next((split for split in splits if output.is_relative_to(split)), None)


def check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    """Refuse a folder this run may not write: not a folder, not a run folder of this
    project, or (unless ``--overwrite``) one that holds a different run, or this run's
    results with no checkpoint that ``--resume`` could continue.

    Read-only. A folder holding the same resolved config (up to run-control keys
    such as ``num_workers``) is the same run: it may be written again, and resumed.
    """
    split_dir = _image_folder_split_holding(output_dir, config)
    if split_dir is not None:
        raise RunFolderError(
            f"output folder {output_dir} is inside {split_dir}, where every folder is read as a class of "
            "the image folder; choose an --output-dir outside it"
        )
    if not _exists(output_dir):
        return
    if not output_dir.is_dir():
        raise RunFolderError(f"output path {output_dir} exists and is not a folder")
    entries = sorted(entry.name for entry in output_dir.iterdir() if not _is_bookkeeping(entry.name))
    if not entries:
        return
    if not is_run_folder(output_dir):
        raise RunFolderError(
            f"output folder {output_dir} is not empty (it holds {entries[0]!r}) and is not a run folder of "
            "this project; choose another --output-dir"
        )
    if config.overwrite:
        unknown = unknown_entry(output_dir)
        if unknown is not None:
            raise RunFolderError(
                f"--overwrite deletes only what a run folder holds, and {unknown} is not a file train.py writes; "
                "nothing was deleted: move it away, or choose another --output-dir"
            )
        return
    config_file = output_dir / CONFIG_FILE
    changed = config_differences(load_yaml(config_file), config) if config_file.exists() else []
    if changed:
        raise RunFolderError(
            f"output folder {output_dir} holds a different run ({'; '.join(changed)}); "
            "choose another --output-dir, or pass --overwrite"
        )
    if config.resume is None and (output_dir / CHECKPOINTS_DIR).exists():
        raise RunFolderError(
            f"output folder {output_dir} holds checkpoints of this run; continue it with --resume auto, "
            "or start again with --overwrite"
        )
    # Started afresh, a run would replace the results of the one there (its checkpoints deleted to save disk).
    if config.resume in (None, "auto") and not checkpoint_format.list_checkpoints(output_dir / CHECKPOINTS_DIR):
        result_file = run_result_file(output_dir)
        if result_file is not None:
            raise no_checkpoint_to_resume(output_dir, result_file)


def run_result_file(run_dir: Path) -> str | None:
    """The name of the first file in ``run_dir`` that holds a run's results: its manifest, its
    final weights, or a metrics record; None if it holds none.

    A run appends a metrics record only once a checkpoint holds that step (train.py's
    finish_epoch), so a folder holding one of these files but no checkpoint holds a run
    that cannot be continued, only replaced.
    """
    for name in (MANIFEST_FILE, WEIGHTS_FILE, METRICS_FILE):
        path = run_dir / name
        if path.is_symlink() or (path.is_file() and (name != METRICS_FILE or path.stat().st_size > 0)):
            return name
    return None


def no_checkpoint_to_resume(run_dir: Path, result_file: str) -> RunFolderError:
    """The refusal of a run that would start afresh over ``run_dir``, which holds ``result_file``
    (:func:`run_result_file`) but no checkpoint to resume."""
    return RunFolderError(
        f"output folder {run_dir} holds a run ({result_file}) with no checkpoint to resume; "
        "start it again with --overwrite, or choose another --output-dir"
    )


def claim_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Make ``run_dir`` this run's folder: create it, lock it, check it and mark it as a
    run folder. ``--overwrite`` empties it later (:func:`clear_run_dir`).

    When: on the main process only, before anything else is written there; the
    lock holds until the process ends. Raises :class:`RunFolderError`. A folder
    that is not a run folder is refused before anything is written into it.
    """
    check_output_dir(run_dir, config)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir)
        # Again, under the lock: the run that held the folder until now may have changed it.
        check_output_dir(run_dir, config)
        if _format_of(run_dir / MARKER_NAME) != RUN_FORMAT:
            write_json(run_dir / MARKER_NAME, {"format": RUN_FORMAT, "version": 1})
    except RunFolderInUseError as error:
        raise RunFolderError(str(error)) from None
    except OSError as error:
        raise RunFolderError(f"cannot write to run folder {run_dir}: {error.strerror}") from None


def clear_run_dir(run_dir: Path) -> None:
    """Delete what ``--overwrite`` replaces: every entry of the claimed ``run_dir`` but its
    lock and marker (:func:`claim_run_dir` checked that it holds nothing else).

    When: on the main process, after every check that can refuse the run (its data, its
    batch size, its model) and before the run writes anything there: a usage error
    deletes nothing.
    """
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in (LOCK_NAME, MARKER_NAME):
            _remove(entry)


# The files a run writes as it ends (train.py's save), in the order they are removed: the manifest,
# which says the run finished with the weights beside it, first.
FINAL_FILES = (MANIFEST_FILE, WEIGHTS_FILE, CURVES_FILE)


def remove_final_files(run_dir: Path) -> None:
    """Delete the files that describe the run's end: the manifest first, then the weights and the curves.

    When: on the main process, before a resumed run trains on: its config, metrics and
    checkpoints then lead to another end than they describe. A kill in between leaves
    no manifest, or one with the weights it describes. Raises :class:`RunFolderError`.
    """
    for name in FINAL_FILES:
        path = run_dir / name
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError as error:
            raise RunFolderError(f"cannot remove {path}, which describes the run's old end: {error.strerror}") from None


def _is_bookkeeping(name: str) -> bool:
    """Whether ``name`` is the lock, the marker or a temporary file of the marker's: a folder
    holding nothing else is as good as empty (a run stopped while claiming it leaves them)."""
    temporary = _TEMPORARY.fullmatch(name)
    return name in (LOCK_NAME, MARKER_NAME) or (temporary is not None and temporary["name"] == MARKER_NAME)


def _remove(entry: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if entry.is_symlink() or not entry.is_dir():
        entry.unlink()
    else:
        shutil.rmtree(entry)


def write_config(output_dir: Path, config: TrainConfig) -> None:
    write_atomic(output_dir / CONFIG_FILE, yaml.safe_dump(config_to_dict(config), sort_keys=False))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as safetensors (``save_file`` would make the file 0600, whatever the umask)."""
    write_atomic(path, serialize_tensors(tensors))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed as each is logged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file with ``records``: a resumed run drops lines logged after its checkpoint."""
        write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in records))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
