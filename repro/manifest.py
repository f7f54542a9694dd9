"""A run folder's layout and its manifest: what a run was and what it produced.

Every reader and writer of a run folder (train.py, the checkpoints, ``python -m
repro compare`` and ``reproduce``) takes the file names from here, so the layout
is spelled in one place.

The manifest (``manifest.json``) is one JSON object with ``format``
(``"repro.manifest"``) and ``version``, whatever fields the training script
records (seeds, environment, the resolved config, ``weights_sha256``), and
``result_neutral_keys``: the config keys that do not change the result (where
the run was written, how many loader workers it had). The training script
names them, so that ``compare`` can tell two runs apart without knowing its
config. A run resumed under another environment than the one it was
checkpointed in records that too (:data:`RESUMED_ELSEWHERE`): its
``environment`` is only the last one, and ``compare`` and ``reproduce`` warn of
the others.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from repro.files import RunFileError, read_json_object, write_atomic

MANIFEST_FILE = "manifest.json"  # what the run was and what it produced (seeds, environment, weights hash)
CONFIG_FILE = "config.yaml"  # the resolved config, every key
# One JSON object per completed epoch; a run that --max-steps stopped inside an epoch ends
# with one for that epoch's part, which the epoch's own record replaces when the run resumes.
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"  # the final weights
CURVES_FILE = "curves.png"  # training curves, when matplotlib is installed
CHECKPOINTS_DIR = "checkpoints"  # one folder per checkpoint, written atomically

MANIFEST_FORMAT = "repro.manifest"
MANIFEST_VERSION = 1

# The manifest field listing each time the run was resumed under another environment than the
# one its checkpoint was written in: [{"step": the step it resumed at, "differences": ["key: old
# -> new", ...]}], oldest first. Absent when it never was (and in manifests written before it existed).
RESUMED_ELSEWHERE = "resumed_in_other_environments"

# For manifests written before they recorded result_neutral_keys: the keys that say where and
# how train.py's runs were started, the only ones compare ignored then.
DEFAULT_RESULT_NEUTRAL_KEYS = frozenset({"output_dir", "overwrite", "resume"})


def write_manifest(run_dir: Path, fields: Mapping[str, Any], result_neutral_keys: Collection[str]) -> Path:
    """Write ``run_dir/manifest.json`` atomically and return its path.

    Args:
        run_dir: the run folder, which exists.
        fields: what the run records (JSON-compatible): seeds, environment,
            ``config`` (the resolved config, as a mapping), ``weights_sha256``.
            ``format``, ``version`` and ``result_neutral_keys`` are set here.
        result_neutral_keys: the config keys whose values do not change the
            weights or the metrics (output folder, worker count); ``compare``
            ignores differences in them.

    When: once, at the end of a run, after the weights are written. Atomic, so
    that a manifest, whose presence says the run finished, is never half there.
    """
    reserved = {"format", "version", "result_neutral_keys"} & set(fields)
    if reserved:
        raise ValueError(f"fields must not set {', '.join(sorted(reserved))}: write_manifest sets them")
    if isinstance(result_neutral_keys, str) or not all(isinstance(key, str) for key in result_neutral_keys):
        raise ValueError(f"result_neutral_keys must be a collection of key names, got {result_neutral_keys!r}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        **fields,
        "result_neutral_keys": sorted(result_neutral_keys),
    }
    path = Path(run_dir) / MANIFEST_FILE
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a manifest: a run folder's ``manifest.json``, or ``path`` itself if it is a file.

    Read as data, within the bounds of :mod:`repro.files` (a manifest may come
    from anyone). Checked: ``format`` (when present) is ``repro.manifest`` and
    ``version`` one this library reads; ``environment`` and ``config``, when
    present, are mappings; ``result_neutral_keys``, when present, a list of strings.

    Raises:
        RunFileError: one line naming the file and what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    manifest = read_json_object(path)
    found = manifest.get("format", MANIFEST_FORMAT)
    if found != MANIFEST_FORMAT:
        raise RunFileError(f"{path} is not a manifest of format {MANIFEST_FORMAT!r}, but {found!r}")
    version = manifest.get("version", MANIFEST_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        raise RunFileError(
            f"{path}: manifest version {version!r} is not one this repro reads (1 to {MANIFEST_VERSION})"
        )
    for name in ("environment", "config"):
        value = manifest.get(name)
        if value is not None and not isinstance(value, dict):
            raise RunFileError(f"{path}: {name!r} must be a mapping, got {type(value).__name__}")
    keys = manifest.get("result_neutral_keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise RunFileError(f"{path}: 'result_neutral_keys' must be a list of config key names")
    if not is_environment_history(manifest.get(RESUMED_ELSEWHERE, [])):
        raise RunFileError(f"{path}: {RESUMED_ELSEWHERE!r} must be a list of {{step, differences}} records")
    return manifest


def is_environment_history(value: Any) -> bool:
    """Whether ``value`` is a list of ``{"step": count, "differences": [text, ...]}`` records
    (:data:`RESUMED_ELSEWHERE`: in a manifest, and in the checkpoints train.py writes)."""
    return isinstance(value, list) and all(
        isinstance(entry, dict)
        and set(entry) == {"step", "differences"}
        and isinstance(entry["step"], int)
        and not isinstance(entry["step"], bool)
        and entry["step"] >= 0
        and isinstance(entry["differences"], list)
        and all(isinstance(line, str) for line in entry["differences"])
        for entry in value
    )


def resumed_elsewhere_warnings(manifest: Mapping[str, Any], run: str = "this run") -> list[str]:
    """One warning line per resume under another environment that a manifest (as :func:`read_manifest`
    returns it) records, naming the run as ``run``: its weights came from more than one
    environment, and may come out differently from a run in any one of them."""
    return [
        f"warning: {run} was resumed at step {entry['step']} under another environment "
        f"({'; '.join(entry['differences'])}), so its weights may not be reproducible in any one environment"
        for entry in manifest.get(RESUMED_ELSEWHERE, [])
    ]


def result_neutral_keys(manifest: Mapping[str, Any]) -> frozenset[str]:
    """The config keys a manifest (as :func:`read_manifest` returns it) names as not changing the result;
    ``DEFAULT_RESULT_NEUTRAL_KEYS`` for a manifest that names none (written before the field existed)."""
    keys = manifest.get("result_neutral_keys")
    return DEFAULT_RESULT_NEUTRAL_KEYS if keys is None else frozenset(keys)
