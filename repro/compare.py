"""Comparing two finished run folders: ``python -m repro compare RUN_A RUN_B``.

:func:`compare_runs` compares the manifests, the environment fingerprints, the
configs, the metrics and the final weights of two runs, and lists every
difference that matters. Config keys that both manifests name as result-neutral
(``result_neutral_keys``, see :mod:`repro.manifest`) may differ: two runs that
differ only in them, with the same weights and metrics, are the same result.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.files import read_metrics, read_safetensors, read_yaml_mapping
from repro.fingerprint import compare_fingerprints
from repro.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RESUMED_ELSEWHERE,
    WEIGHTS_FILE,
    read_manifest,
    result_neutral_keys,
    resumed_elsewhere_warnings,
)
from repro.report import DIFFERENT, SAME, CommandError, Report, same_number

# How many differences of one section a report lists before "... and N more".
LINES_SHOWN = 10

# Compared in sections of their own, or (result_neutral_keys) telling how to compare the configs,
# or (RESUMED_ELSEWHERE) warned of, not compared: not as plain manifest fields.
MANIFEST_SECTION_KEYS = frozenset({"environment", "config", "weights_sha256", "result_neutral_keys", RESUMED_ELSEWHERE})

_ABSENT = object()


@dataclass
class _Run:
    folder: Path
    manifest: dict[str, Any]
    environment: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]]


def compare_runs(run_a: Path, run_b: Path) -> Report:
    """Compare two finished run folders and list every difference that matters.

    Compared: the manifests (without timing fields), the environment
    fingerprints, ``config.yaml``, ``metrics.jsonl`` line by line (without
    timing fields, whose names end in ``_s``), and the final weights: the
    manifests' ``weights_sha256`` and the tensors of the ``model.safetensors``
    files, which are always read (the tensors that differ and by how much at
    most; a digest that says otherwise than the files is reported as such).

    Config keys that both manifests list in ``result_neutral_keys`` may differ:
    when nothing else does, the report is ``SAME`` and names them. A manifest
    without the field (written before it existed) counts ``output_dir``,
    ``overwrite`` and ``resume`` as result-neutral, as compare always did.
    A run whose manifest records resumes under other environments (``RESUMED_ELSEWHERE``,
    see :mod:`repro.manifest`) gets a warning line for each, whatever the verdict.

    Raises:
        CommandError: a folder, or its manifest, config or metrics, is missing (named, with
            the four files compare needs), unreadable
            or malformed (not UTF-8, not valid JSON or YAML, past the bounds of
            :mod:`repro.files`); a manifest records no ``weights_sha256``; or a ``model.safetensors``
            is missing, a link or not one.
    """
    a, b = _load_run(Path(run_a)), _load_run(Path(run_b))
    neutral = result_neutral_keys(a.manifest) & result_neutral_keys(b.manifest)
    neutral_differences = sorted(
        key for key in neutral if not same_number(a.config.get(key, _ABSENT), b.config.get(key, _ABSENT))
    )
    sections = {
        "weights": _weight_differences(a, b),
        "metrics": _metrics_differences(a.metrics, b.metrics),
        "config": _differences(a.config, b.config, skip=neutral),
        "manifest": _differences(
            a.manifest, b.manifest, skip=MANIFEST_SECTION_KEYS | {k for k in {*a.manifest, *b.manifest} if _timing(k)}
        ),
        "environment": compare_fingerprints(a.environment, b.environment),
    }
    differing = [name for name, lines in sections.items() if lines]
    # The environment each manifest records is the last one its run trained in.
    warnings = [*resumed_elsewhere_warnings(a.manifest, f"A ({a.folder})")]
    warnings += resumed_elsewhere_warnings(b.manifest, f"B ({b.folder})")
    if not differing:
        identical = f"runs are identical: weights ({a.manifest.get('weights_sha256')}), metrics, "
        if not neutral_differences:
            return Report(SAME, [identical + "config, manifest and environment", *warnings])
        return Report(
            SAME,
            [
                identical + "manifest and environment",
                f"same result; the configs differ only in result-neutral keys: {', '.join(neutral_differences)}",
                *warnings,
            ],
        )
    lines = [f"runs differ in: {', '.join(differing)}  (A = {a.folder}, B = {b.folder})"]
    for name in differing:
        lines.append(f"{name}:")
        lines += ["  " + line for line in _limit(sections[name], "differences")]
    return Report(DIFFERENT, [*lines, *warnings])


def _timing(key: str) -> bool:
    """Timing fields, which differ from run to run by nature: by this project's
    convention their names end in ``_s`` (seconds, or per second)."""
    return key.endswith("_s")


def _load_run(folder: Path) -> _Run:
    if not folder.is_dir():
        raise CommandError(f"run folder not found: {folder}")
    manifest = read_manifest(folder)  # missing: "(is the run finished?)", as train.py writes it last
    for name in (CONFIG_FILE, METRICS_FILE):  # what a script of your own may not write
        if not os.path.lexists(folder / name):
            raise CommandError(
                f"{folder / name} not found: compare needs each run folder's {MANIFEST_FILE}, {CONFIG_FILE}, "
                f"{METRICS_FILE} and {WEIGHTS_FILE}"
            )
    return _Run(
        folder,
        manifest,
        manifest.get("environment") or {},
        read_yaml_mapping(folder / CONFIG_FILE),
        read_metrics(folder / METRICS_FILE),
    )


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], skip: Collection[str] = (), prefix: str = "") -> list[str]:
    """``key: A's value -> B's value`` for each key whose values differ, nested mappings key by key."""
    lines = []
    for key in [*a, *(key for key in b if key not in a)]:
        if key in skip:
            continue
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(before, dict) and isinstance(after, dict):
            lines += _differences(before, after, prefix=f"{prefix}{key}.")
        elif not same_number(before, after):
            lines.append(f"{prefix}{key}: {_show(before)} -> {_show(after)}")
    return lines


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _metrics_differences(first: list[dict], second: list[dict]) -> list[str]:
    lines = []
    if len(first) != len(second):
        lines.append(f"A has {len(first)} lines, B has {len(second)}")
    for number, (a, b) in enumerate(zip(first, second, strict=False), start=1):
        skip = {key for key in {*a, *b} if _timing(key)}
        label = f"epoch {a['epoch']}" if "epoch" in a else f"line {number}"
        lines += [f"{label}: {line}" for line in _differences(a, b, skip=skip)]
    return lines


def _weight_differences(a: _Run, b: _Run) -> list[str]:
    """How the final weights differ: the manifests' ``weights_sha256`` and, tensor by tensor, the two
    ``model.safetensors``, always read: a manifest's digest alone cannot tell an edited or swapped file.

    The digest hashes the model's ``state_dict`` order, which safetensors does not keep, so a file
    cannot be checked against its own manifest; the two files are checked against each other, and
    a verdict of the files that disagrees with the manifests' is reported as such.
    """
    digests = [_recorded_digest(run) for run in (a, b)]
    tensors_a, tensors_b = (_read_weights(run) for run in (a, b))
    names = [*tensors_a, *(name for name in tensors_b if name not in tensors_a)]
    differing = []
    for name in names:
        if name not in tensors_a or name not in tensors_b:
            differing.append(f"{name}: only in {'A' if name in tensors_a else 'B'}")
            continue
        ta, tb = tensors_a[name], tensors_b[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            differing.append(f"{name}: {ta.dtype}{list(ta.shape)} -> {tb.dtype}{list(tb.shape)}")
        elif not ta.equal(tb):
            largest = (ta.double() - tb.double()).abs().max().item()
            differing.append(f"{name}: max abs difference {largest:.3g}")
    if digests[0] == digests[1]:
        if not differing:
            return []
        lines = [
            f"weights_sha256: {digests[0]} in both manifests, but the {WEIGHTS_FILE} files differ: "
            "a weights file does not match its manifest"
        ]
    else:
        lines = [f"weights_sha256: {digests[0]} -> {digests[1]}"]
        if not differing:
            return [
                *lines,
                f"but the tensors of the {WEIGHTS_FILE} files are identical: "
                "a manifest's weights_sha256 does not match its weights file",
            ]
    return [
        *lines,
        f"{len(differing)} of {len(names)} tensors of {WEIGHTS_FILE} differ:",
        *("  " + line for line in differing),
    ]


def _recorded_digest(run: _Run) -> str:
    digest = run.manifest.get("weights_sha256")
    if not isinstance(digest, str):
        raise CommandError(
            f"{run.folder / MANIFEST_FILE} records no weights_sha256 (is the run finished?): cannot compare the weights"
        )
    return digest


def _read_weights(run: _Run) -> dict[str, Any]:
    path = run.folder / WEIGHTS_FILE
    if not os.path.lexists(path):
        raise CommandError(f"{path} not found: cannot compare the weights")
    return read_safetensors(path)


def _limit(lines: list[str], what: str) -> list[str]:
    if len(lines) <= LINES_SHOWN:
        return lines
    return [*lines[:LINES_SHOWN], f"... and {len(lines) - LINES_SHOWN} more {what}"]
