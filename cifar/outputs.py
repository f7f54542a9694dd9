"""The run folder: resolved config, metrics, manifest and final weights.

Files are written to a temporary name and renamed into place, so a crash never
leaves a half-written file behind a valid name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cifar.config import ConfigError, TrainConfig, config_differences, config_to_dict, load_yaml


def default_output_dir(config: TrainConfig) -> Path:
    """``runs/<dataset>-<model>-seed<seed>``: deterministic, so a rerun finds its folder."""
    return Path("runs") / f"{config.dataset}-{config.model}-seed{config.seed}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_output_dir(output_dir: Path, config: TrainConfig) -> None:
    """Refuse a folder that already holds a different run, unless ``--overwrite``.

    A folder holding the same resolved config (up to run-control keys such as
    ``num_workers``) is the same run: it may be written again, and resumed.
    """
    config_file = output_dir / "config.yaml"
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"output path {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    if not config_file.exists():
        raise ConfigError(
            f"output folder {output_dir} is not empty and holds no run; choose another or pass --overwrite"
        )
    if config.overwrite:
        return
    changed = config_differences(load_yaml(config_file), config)
    if changed:
        raise ConfigError(
            f"output folder {output_dir} holds a different run ({'; '.join(changed)}); "
            "choose another --output-dir, or pass --overwrite"
        )
    if config.resume is None and (output_dir / "checkpoints").exists():
        raise ConfigError(
            f"output folder {output_dir} holds checkpoints of this run; continue it with --resume auto, "
            "or start again with --overwrite"
        )


def write_config(output_dir: Path, config: TrainConfig) -> None:
    write_atomic(output_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


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
