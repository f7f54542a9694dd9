"""Verification: prove that a run reproduces, and find where it stops reproducing.

The logic behind ``python -m repro`` (``repro/__main__.py`` only parses and prints):

- :func:`verify_command` runs a training command twice with per-step tracing
  (:mod:`repro.trace`) and names the first step, and the first tensors, at which
  the two runs differ; or says that they are bitwise identical.
- :func:`compare_runs` compares two finished run folders: manifests, environment
  fingerprints, configs, metrics and final weights.
- :func:`reproduce_run` re-runs a finished run from its recorded config with this
  repository's ``train.py`` and checks that the weights come out the same.
- :func:`environment_report` shows what bitwise equality depends on here.

Each returns a :class:`Report`: the lines to print and the exit status (0 same,
1 different, 2 could not tell). Problems that stop a check before it has a
verdict raise :class:`CommandError`. Commands run from argument lists, never
through a shell, and a manifest is only ever read as data: nothing it names is
executed.

PyYAML and safetensors are imported inside the functions that read
``config.yaml`` and ``model.safetensors``: they come with the pipeline
(``pip install .[pipeline]``), and ``import repro`` needs only torch and NumPy.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from repro.determinism import determinism_settings
from repro.distributed import launcher_world_size
from repro.fingerprint import compare_fingerprints, environment_fingerprint
from repro.hashseed import hash_seed_is_fixed
from repro.trace import TRACE_DIR_VARIABLE, TRACE_STEPS_VARIABLE

SAME, DIFFERENT, ERROR = 0, 1, 2

# How many differing tensors, metrics lines or weights a report lists before "... and N more".
TENSORS_SHOWN = 3
LINES_SHOWN = 10
TAIL_LINES = 20

# The parts of a run's config that say where and how it was started, not what it computes.
RUN_LOCATION_KEYS = frozenset({"output_dir", "overwrite", "resume"})

# Compared in sections of their own, not as plain manifest fields.
MANIFEST_SECTION_KEYS = frozenset({"environment", "config", "weights_sha256"})

# Bounds on a run folder's files, which may come from anyone. What train.py writes stays far
# below them; past them, reading or comparing a file would exhaust memory, time or the stack.
MAX_TEXT_BYTES = 16 * 1024 * 1024  # manifest.json, metrics.jsonl
MAX_YAML_BYTES = 1024 * 1024  # config.yaml, a few dozen keys
MAX_NESTING = 32  # levels of objects and lists in one document
MAX_VALUES = 100_000  # values in one document, a YAML alias counted each time it is used
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header

# The datasets for which train.py creates nothing: for CIFAR, it creates data_dir to download into.
DATASETS_READ_IN_PLACE = frozenset({"synthetic", "imagefolder"})


class CommandError(ValueError):
    """A problem that stops a check before it has a verdict: one line, exit status 2."""


@dataclass
class Report:
    """What a check found: ``lines`` to print and the exit ``status``
    (``SAME`` 0, ``DIFFERENT`` 1, ``ERROR`` 2)."""

    status: int
    lines: list[str]


def _silent(line: str) -> None:
    """The default ``say``: library callers who want no progress lines get none."""


# --------------------------------------------------------------------------- verify


def verify_command(
    command: Sequence[str],
    steps: int = 20,
    *,
    trace_root: Path | None = None,
    say: Callable[[str], None] = _silent,
) -> Report:
    """Run ``command`` twice with tracing on and compare the two traces step by step.

    Each run gets ``REPRO_TRACE_DIR`` (a fresh folder: ``run-1`` or ``run-2``
    under ``trace_root``, or under a temporary folder removed afterwards) and
    ``REPRO_TRACE_STEPS=steps``; a training loop that honours them (``train.py``
    does, through :class:`repro.trace.StepTracer`) writes ``rank-R.jsonl`` for
    every rank, which also makes the check work under ``accelerate launch`` and
    ``torchrun``.

    Returns a ``SAME`` report ("bitwise reproducible over N steps"), a
    ``DIFFERENT`` one naming the first step and tensors that differ, or an
    ``ERROR`` one with the exit status and the last lines of a run that failed.
    """
    if not command:
        raise ValueError("verify needs a command to run")
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    with tempfile.TemporaryDirectory(prefix="repro-verify-") as scratch:
        root = Path(scratch) if trace_root is None else Path(trace_root)
        traces = []
        for number in (1, 2):
            trace_dir = root / f"run-{number}"
            if trace_dir.exists() and any(trace_dir.iterdir()):
                raise CommandError(f"trace folder {trace_dir} is not empty; choose a new --trace-dir")
            say(f"run {number} of 2, {steps} steps: {shlex.join(command)}")
            result = _run_traced(command, trace_dir, steps)
            if result.returncode != 0:
                return Report(
                    ERROR,
                    [
                        f"run {number} failed with exit status {result.returncode}; the end of its output:",
                        *("  " + line for line in _tail(result.stdout)),
                    ],
                )
            traces.append(read_trace(trace_dir))
        return compare_traces(traces[0], traces[1], steps)


def _run_traced(command: Sequence[str], trace_dir: Path, steps: int) -> subprocess.CompletedProcess:
    trace_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, TRACE_DIR_VARIABLE: str(trace_dir), TRACE_STEPS_VARIABLE: str(steps)}
    try:
        return subprocess.run(
            list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as error:
        raise CommandError(f"cannot run {command[0]!r}: {error.strerror}") from None


def _tail(output: str) -> list[str]:
    """The last non-empty lines of ``output``; progress bars redraw with ``\\r``, so it splits there too."""
    lines = [line.rstrip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-TAIL_LINES:]


def read_trace(directory: Path) -> dict[int, list[dict[str, Any]]]:
    """Read the ``rank-R.jsonl`` files of one traced run: ``{rank: [one record per step]}``."""
    trace: dict[int, list[dict[str, Any]]] = {}
    for path in directory.glob("rank-*.jsonl"):
        match = re.fullmatch(r"rank-(\d+)\.jsonl", path.name)
        if match is None:
            continue
        try:
            trace[int(match[1])] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise CommandError(f"{path} is not a valid trace: {error}") from None
    return dict(sorted(trace.items()))


def compare_traces(first: dict[int, list[dict]], second: dict[int, list[dict]], steps: int) -> Report:
    """Compare two traces (as :func:`read_trace` returns them) rank by rank, step by step.

    ``steps`` is how many steps were asked for; a shorter trace (a command that
    trains fewer steps) is compared as far as it goes, and the report says so.
    """
    for number, trace in ((1, first), (2, second)):
        if not trace:
            raise CommandError(
                f"run {number} wrote no trace: its training loop must call repro.trace.StepTracer.record "
                "after each optimizer step (see repro/trace.py)"
            )
        empty = [rank for rank, records in trace.items() if not records]
        if empty:
            raise CommandError(f"run {number} traced no step on rank {empty[0]}")
    if set(first) != set(second):
        raise CommandError(f"the runs traced different ranks: {sorted(first)} and {sorted(second)}")

    first_difference = {
        rank: index for rank in first if (index := _first_differing_record(first[rank], second[rank])) is not None
    }
    if not first_difference:
        traced = len(first[min(first)])
        ranks = f"{len(first)} ranks" if len(first) > 1 else "1 rank"
        lines = [f"bitwise reproducible over {traced} steps ({ranks}; every parameter and buffer after every step)"]
        if traced < steps:
            lines.append(f"note: the command stopped after {traced} of the {steps} steps asked for")
        return Report(SAME, lines)

    index = min(first_difference.values())
    ranks = [rank for rank, at in first_difference.items() if at == index]
    step = _step_label(first[ranks[0]], second[ranks[0]], index)
    lines = [f"not reproducible: the runs first differ at step {step} (identical before it)"]
    for rank in ranks:
        lines += _describe_difference(rank, first[rank], second[rank], index)
    return Report(DIFFERENT, lines)


def _same_number(a: Any, b: Any) -> bool:
    """Equal, counting two NaNs as equal: a loss that diverged twice the same way reproduces."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _first_differing_record(first: list[dict], second: list[dict]) -> int | None:
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a.get("step") != b.get("step") or a.get("tensors") != b.get("tensors"):
            return index
        if not _same_number(a.get("loss"), b.get("loss")):
            return index
    return None if len(first) == len(second) else min(len(first), len(second))


def _step_label(first: list[dict], second: list[dict], index: int) -> Any:
    record = first[index] if index < len(first) else second[index]
    return record.get("step", index + 1)


def _describe_difference(rank: int, first: list[dict], second: list[dict], index: int) -> list[str]:
    """Lines on how rank ``rank``'s records at ``index`` differ: loss, then the first tensors."""
    if index >= len(first) or index >= len(second):
        return [f"  rank {rank}: run 1 traced {len(first)} steps, run 2 traced {len(second)}"]
    a, b = first[index], second[index]
    lines = []
    if a.get("step") != b.get("step"):
        lines.append(f"  rank {rank}: step numbers differ: {a.get('step')} vs {b.get('step')}")
    loss_a, loss_b = a.get("loss"), b.get("loss")
    if _same_number(loss_a, loss_b):
        lines.append(f"  rank {rank}: loss identical ({loss_a})")
    else:
        lines.append(f"  rank {rank}: loss {loss_a!r} vs {loss_b!r} (difference {_difference(loss_a, loss_b)})")
    tensors_a, tensors_b = a.get("tensors", {}), b.get("tensors", {})
    names = [*tensors_a, *(name for name in tensors_b if name not in tensors_a)]
    differing = [name for name in names if tensors_a.get(name) != tensors_b.get(name)]
    if differing:
        lines.append(f"  rank {rank}: {len(differing)} of {len(names)} tensors differ; the first, in state_dict order:")
    stats_a, stats_b = a.get("stats", {}), b.get("stats", {})
    for name in differing[:TENSORS_SHOWN]:
        if name not in tensors_a or name not in tensors_b:
            lines.append(f"    {name}: only in run {1 if name in tensors_a else 2}")
            continue
        (sum_a, norm_a), (sum_b, norm_b) = stats_a[name], stats_b[name]
        lines.append(
            f"    {name}: sum differs by {_difference(sum_a, sum_b)}, L2 norm by {_difference(norm_a, norm_b)}"
        )
    if len(differing) > TENSORS_SHOWN:
        lines.append(f"    ... and {len(differing) - TENSORS_SHOWN} more")
    return lines


def _difference(a: Any, b: Any) -> str:
    try:
        return f"{float(b) - float(a):+.3g}"
    except (TypeError, ValueError):
        return "unknown"


# --------------------------------------------------------------------------- compare


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
    fingerprints, ``config.yaml`` (without where and how the run was started:
    ``output_dir``, ``overwrite``, ``resume``), ``metrics.jsonl`` line by line
    (without timing fields, whose names end in ``_s``), and the final weights
    (``weights_sha256``; when it differs, the tensors of ``model.safetensors``
    that differ and by how much at most).

    Raises:
        CommandError: a folder, or its manifest, config or metrics, is missing, unreadable
            or malformed (not UTF-8, not valid JSON or YAML, past the ``MAX_*`` bounds
            above); or a ``model.safetensors`` that has to be read is a link or not one.
    """
    a, b = _load_run(Path(run_a)), _load_run(Path(run_b))
    sections = {
        "weights": _weight_differences(a, b),
        "metrics": _metrics_differences(a.metrics, b.metrics),
        "config": _differences(a.config, b.config, skip=RUN_LOCATION_KEYS),
        "manifest": _differences(
            a.manifest, b.manifest, skip=MANIFEST_SECTION_KEYS | {k for k in {*a.manifest, *b.manifest} if _timing(k)}
        ),
        "environment": compare_fingerprints(a.environment, b.environment),
    }
    differing = [name for name, lines in sections.items() if lines]
    if not differing:
        return Report(
            SAME,
            [
                f"runs are identical: weights ({a.manifest.get('weights_sha256')}), metrics, config, "
                "manifest and environment"
            ],
        )
    lines = [f"runs differ in: {', '.join(differing)}  (A = {a.folder}, B = {b.folder})"]
    for name in differing:
        lines.append(f"{name}:")
        lines += ["  " + line for line in _limit(sections[name], "differences")]
    return Report(DIFFERENT, lines)


def _timing(key: str) -> bool:
    """Timing fields, which differ from run to run by nature: by this project's
    convention their names end in ``_s`` (seconds, or per second)."""
    return key.endswith("_s")


def _load_run(folder: Path) -> _Run:
    if not folder.is_dir():
        raise CommandError(f"run folder not found: {folder}")
    manifest_path = folder / "manifest.json"
    manifest = _read_json_object(manifest_path)
    return _Run(
        folder,
        manifest,
        _environment(manifest, manifest_path),
        _read_yaml_mapping(folder / "config.yaml"),
        _read_metrics(folder / "metrics.jsonl"),
    )


# Reading a run folder's files. Every problem with one (missing, a link, not UTF-8, not
# valid JSON or YAML, too large, nested too deeply) is a CommandError: one line, exit 2.


def _first_line(error: BaseException) -> str:
    """An error's message cut to its first line: reports of a bad file stay one line long."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    Links are not followed: train.py writes none, and one can point anywhere,
    ``/dev/zero`` included, which would never end. Opening does not block,
    which a FIFO would until something wrote to it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise CommandError(f"{path} not found (is the run finished?)") from None
    except OSError as error:
        if path.is_symlink():
            raise CommandError(f"{path} is a symbolic link; a run folder's files are regular files") from None
        raise CommandError(f"cannot read {path}: {error.strerror}") from None
    file = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        file.close()
        raise CommandError(f"{path} is not a regular file")
    return file


def _read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``limit`` bytes."""
    with _open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise CommandError(f"{path} is {size} bytes, more than the {limit} a run folder's file may have")
        data = file.read(limit + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CommandError(f"{path} is not UTF-8 text (byte {error.start} is not)") from None


def _check_shape(data: Any, where: str) -> None:
    """Refuse ``data`` nested more than ``MAX_NESTING`` deep or holding more than
    ``MAX_VALUES`` values: comparing or printing it would recurse past Python's
    limit, or, for a YAML alias bomb, run out of memory."""
    pending, values = [(data, 0)], 0
    while pending:
        value, depth = pending.pop()
        values += 1
        if depth > MAX_NESTING:
            raise CommandError(f"{where} is nested more than {MAX_NESTING} levels deep")
        if values > MAX_VALUES:
            raise CommandError(f"{where} holds more than {MAX_VALUES} values (YAML aliases counted at each use)")
        if isinstance(value, dict):
            pending += [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list | tuple | set):
            pending += [(item, depth + 1) for item in value]


def _parse_json(text: str, where: str) -> Any:
    try:
        data = json.loads(text)
    except RecursionError:
        raise CommandError(f"{where} is nested too deeply to read") from None
    except ValueError as error:  # JSONDecodeError, or an integer of more digits than Python converts
        raise CommandError(f"{where} is not valid JSON: {_first_line(error)}") from None
    _check_shape(data, where)
    return data


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _parse_json(_read_text(path), str(path))
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a JSON object")
    return data


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    import yaml

    text = _read_text(path, MAX_YAML_BYTES)
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise CommandError(f"{path} is nested too deeply to read") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer of more digits than Python converts
        raise CommandError(f"{path} is not valid YAML: {_first_line(error)}") from None
    _check_shape(data, str(path))
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a mapping of config keys to values")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            record = _parse_json(line, f"{path} line {number}")
            if not isinstance(record, dict):
                raise CommandError(f"{path} line {number} is not a JSON object")
            records.append(record)
    return records


def _environment(manifest: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The environment fingerprint a manifest records; empty when it records none."""
    environment = manifest.get("environment")
    if environment is None:
        return {}
    if not isinstance(environment, dict):
        raise CommandError(f"{path}: 'environment' must be a mapping, got {type(environment).__name__}")
    return environment


def _read_weights(path: Path) -> dict[str, Any]:
    """The tensors of ``model.safetensors``, refusing a file that is not one.

    The file starts with the length of its JSON header, 8 bytes little-endian:
    a length past the end of the file, or past safetensors' own limit, is
    refused before anything more is read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    with _open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        header_length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CommandError(
                f"{path} is not a safetensors file: its header length ({header_length} bytes) "
                f"does not fit in its {size} bytes"
            )
        data = prefix + file.read()
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError) as error:  # KeyError: a dtype torch lacks
        raise CommandError(f"{path} is not a valid safetensors file: {_first_line(error)}") from None


_ABSENT = object()


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], skip: Collection[str] = (), prefix: str = "") -> list[str]:
    """``key: A's value -> B's value`` for each key whose values differ, nested mappings key by key."""
    lines = []
    for key in [*a, *(key for key in b if key not in a)]:
        if key in skip:
            continue
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(before, dict) and isinstance(after, dict):
            lines += _differences(before, after, prefix=f"{prefix}{key}.")
        elif not _same_number(before, after):
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
    digest_a, digest_b = a.manifest.get("weights_sha256"), b.manifest.get("weights_sha256")
    if digest_a == digest_b:
        return []
    lines = [f"weights_sha256: {digest_a} -> {digest_b}"]
    files = [a.folder / "model.safetensors", b.folder / "model.safetensors"]
    missing = [str(path) for path in files if not os.path.lexists(path)]
    if missing:
        return [*lines, f"no tensor-by-tensor comparison: {', '.join(missing)} not found"]
    tensors_a, tensors_b = _read_weights(files[0]), _read_weights(files[1])
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
    return [
        *lines,
        f"{len(differing)} of {len(names)} tensors of model.safetensors differ:",
        *("  " + line for line in differing),
    ]


def _limit(lines: list[str], what: str) -> list[str]:
    if len(lines) <= LINES_SHOWN:
        return lines
    return [*lines[:LINES_SHOWN], f"... and {len(lines) - LINES_SHOWN} more {what}"]


# --------------------------------------------------------------------------- reproduce


def train_script() -> Path:
    """This repository's ``train.py``, next to the ``repro`` package: the only program
    :func:`reproduce_run` ever runs."""
    return Path(__file__).resolve().parents[1] / "train.py"


def reproduce_run(
    manifest_path: Path, output_dir: Path | None = None, *, say: Callable[[str], None] = _silent
) -> Report:
    """Re-run a finished run from its recorded config and check its weights.

    The resolved config comes from the manifest's ``config`` field (or the run
    folder's ``config.yaml``), with ``output_dir`` set to a fresh folder
    (``output_dir``, or ``run`` in a new temporary folder), ``overwrite`` false
    and ``resume`` none. It is written to a YAML file in that temporary folder
    and passed to this repository's ``train.py`` with ``--config``, run by this
    interpreter; ``train.py`` validates every key. The manifest is data: none of
    its values is ever executed, or passed to a shell.

    Nothing is created outside the temporary folder and ``output_dir``: a
    ``data_dir`` that train.py would create (to download CIFAR into) must exist
    already. The temporary folder is removed when the re-run fails or is
    interrupted (by an exception, ``KeyboardInterrupt`` included; ``python -m
    repro`` turns SIGTERM into one), and kept when it holds a finished re-run.

    Before the run, ``say`` receives one warning per difference between the
    recorded environment and this one: with any, bitwise equality is not promised.

    Returns ``SAME`` when the new ``weights_sha256`` matches the recorded one,
    ``DIFFERENT`` when it does not, ``ERROR`` when ``train.py`` fails (its own
    error is printed above the report).
    """
    import yaml

    path = Path(manifest_path)
    if path.is_dir():
        path = path / "manifest.json"
    manifest = _read_json_object(path)
    config = manifest.get("config")
    if config is None:
        config = _read_yaml_mapping(path.parent / "config.yaml")
    if not isinstance(config, dict):
        raise CommandError(f"{path}: 'config' must be a mapping of config keys to values")
    recorded = manifest.get("weights_sha256")
    if not isinstance(recorded, str):
        raise CommandError(f"{path} records no weights_sha256 (is the run finished?)")
    world_size = manifest.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise CommandError(f"{path}: world_size must be a positive integer, got {world_size!r}")
    environment = _environment(manifest, path)
    _check_data_dir(config, path)
    script = train_script()
    if not script.is_file():
        raise CommandError(f"reproduce runs this repository's train.py, which is not at {script}")
    chosen = Path(output_dir) if output_dir is not None else None
    if chosen is not None and chosen.exists() and (not chosen.is_dir() or any(chosen.iterdir())):
        raise CommandError(f"output folder {chosen} is not empty; choose a new one")

    warnings = [
        f"warning: environment differs, bitwise equality is not promised: {difference}"
        for difference in compare_fingerprints(environment, environment_fingerprint(world_size, script.parent))
    ]
    if world_size != 1:
        warnings.append(
            f"warning: the run used {world_size} processes and this re-run uses one: "
            "weights agree only within floating-point tolerance across world sizes"
        )
    for warning in warnings:
        say(warning)

    # A trace request exported in this shell would cut the re-run short.
    env = {key: value for key, value in os.environ.items() if key not in (TRACE_DIR_VARIABLE, TRACE_STEPS_VARIABLE)}
    scratch = Path(tempfile.mkdtemp(prefix="repro-reproduce-"))
    output = chosen or scratch / "run"
    config_file = scratch / "config.yaml"
    keep_scratch = False
    try:
        rerun_config = {**config, "output_dir": str(output), "overwrite": False, "resume": None}
        config_file.write_text(yaml.safe_dump(rerun_config, sort_keys=False))
        command = [sys.executable, str(script), "--config", str(config_file)]
        say(f"re-running {path} into {output}: {shlex.join(command)}")
        # The re-run's output goes straight to this terminal: it may train for hours.
        status = subprocess.run(command, env=env).returncode
        if status != 0:
            return Report(ERROR, [f"could not reproduce: train.py exited with status {status} (its error is above)"])
        reproduced = _read_json_object(output / "manifest.json").get("weights_sha256")
        keep_scratch = chosen is None
    finally:
        if keep_scratch:
            config_file.unlink()
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    if reproduced == recorded:
        return Report(SAME, [f"reproduced: weights_sha256 {recorded} matches", f"the new run is in {output}"])
    lines = [
        "not reproduced: the weights differ",
        f"  recorded    {recorded}",
        f"  reproduced  {reproduced}",
        f"see what differs with: python -m repro compare {shlex.quote(str(path.parent))} {shlex.quote(str(output))}",
    ]
    if warnings:
        lines.append("the environment differs too (see the warnings above)")
    return Report(DIFFERENT, lines)


def _check_data_dir(config: Mapping[str, Any], path: Path) -> None:
    """Refuse a re-run whose ``data_dir`` train.py would create: a manifest may come from
    anyone, and reproduce must not create folders wherever one says.

    train.py creates a missing ``data_dir`` only to download CIFAR into it; the
    synthetic set reads no folder, and an image folder must exist already.
    """
    if config.get("dataset") in DATASETS_READ_IN_PLACE:
        return
    data_dir = config.get("data_dir")
    if not isinstance(data_dir, str) or not Path(data_dir).is_dir():
        raise CommandError(
            f"{path}: the run's data_dir {data_dir!r} is not a folder here, and reproduce creates none "
            "(train.py would, to download the dataset into); put the dataset there first"
        )


# --------------------------------------------------------------------------- env


def environment_facts() -> dict[str, Any]:
    """What bitwise equality depends on in this process, as JSON-compatible data.

    The environment fingerprint (with the git state of the current folder), the
    determinism settings in force, and the two variables that only take effect
    when a process starts: ``PYTHONHASHSEED`` and ``CUBLAS_WORKSPACE_CONFIG``.
    """
    return {
        "environment": environment_fingerprint(launcher_world_size() or 1, Path.cwd()),
        "determinism": determinism_settings(),
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),
        "python_hash_seed_fixed": hash_seed_is_fixed(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def environment_report(as_json: bool = False) -> Report:
    """:func:`environment_facts` as readable lines, or as one JSON document."""
    facts = environment_facts()
    if as_json:
        return Report(SAME, [json.dumps(facts, indent=2)])
    lines = ["environment:"]
    lines += [f"  {key}: {value}" for key, value in facts["environment"].items()]
    lines.append("determinism settings of this process (train.py applies its --determinism mode at start-up):")
    # The mode is None outside a training run, and CUBLAS_WORKSPACE_CONFIG gets its own line below.
    shown = {
        key: value for key, value in facts["determinism"].items() if key not in ("mode", "cublas_workspace_config")
    }
    lines += [f"  {key}: {value}" for key, value in shown.items()]
    hash_seed = facts["python_hash_seed"]
    if facts["python_hash_seed_fixed"]:
        lines.append(f"PYTHONHASHSEED: {hash_seed} (fixed since this process started)")
    else:
        state = "not set" if hash_seed is None else f"{hash_seed!r}, not fixed for this process"
        lines.append(f"PYTHONHASHSEED: {state}; train.py re-executes itself with it fixed")
    cublas = facts["cublas_workspace_config"]
    lines.append(
        f"CUBLAS_WORKSPACE_CONFIG: {cublas}"
        if cublas
        else "CUBLAS_WORKSPACE_CONFIG: not set (strict mode sets :4096:8 before CUDA starts)"
    )
    return Report(SAME, lines)
