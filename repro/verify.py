"""Run-twice verification: prove that a training command reproduces, and find where it stops.

:func:`verify_command` runs a training command twice with per-step tracing
(:mod:`repro.trace`) and names the first step, and the first tensors, at which
the two runs differ; or says that they are bitwise identical. It is the logic
behind ``python -m repro verify`` (``repro/__main__.py`` only parses and prints).

It returns a :class:`repro.report.Report`: the lines to print and the exit status
(0 same, 1 different, 2 could not tell). Problems that stop the check before it
has a verdict raise :class:`repro.report.CommandError`. Commands run from
argument lists, never through a shell.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from repro.files import RunFileError, read_metrics
from repro.report import DIFFERENT, ERROR, SAME, CommandError, Report, same_number, short, silent
from repro.trace import TRACE_DIR_VARIABLE, TRACE_STEPS_VARIABLE

# How many differing tensors a report lists before "... and N more", and how many lines of a failed run's output.
TENSORS_SHOWN = 3
TAIL_LINES = 20


def verify_command(
    command: Sequence[str],
    steps: int = 20,
    *,
    trace_root: Path | None = None,
    say: Callable[[str], None] = silent,
) -> Report:
    """Run ``command`` twice with tracing on and compare the two traces step by step.

    Each run gets ``REPRO_TRACE_DIR`` (a fresh folder: ``run-1`` or ``run-2``
    under ``trace_root``, or under a temporary folder removed afterwards) and
    ``REPRO_TRACE_STEPS=steps``; a training loop that honours them (``train.py``
    does, through :class:`repro.trace.StepTracer`) writes ``rank-R.jsonl`` for
    every rank, which also makes the check work under ``accelerate launch`` and
    ``torchrun``.

    Returns a ``SAME`` report ("bitwise reproducible over N steps"), a
    ``DIFFERENT`` one naming the first step and tensors that differ ("the
    initial state" when the traces hold it and it differs), or an ``ERROR`` one
    with the exit status and the last lines of a run that failed. When the
    second run fails, what it traced before is compared with the first run's
    trace: a difference there (a run that diverged, then failed) makes the
    report ``DIFFERENT``, with the failure after it.

    A relative ``trace_root`` is taken from the current folder, so that it
    names the same folder for a command that changes folder.
    """
    if not command:
        raise ValueError("verify needs a command to run")
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    with tempfile.TemporaryDirectory(prefix="repro-verify-") as scratch:
        root = (Path(scratch) if trace_root is None else Path(trace_root)).absolute()
        traces = []
        for number in (1, 2):
            trace_dir = root / f"run-{number}"
            for folder in (root, trace_dir):
                if folder.exists() and not folder.is_dir():
                    raise CommandError(f"trace folder {folder} is a file; choose a new --trace-dir")
            if trace_dir.exists() and any(trace_dir.iterdir()):
                raise CommandError(f"trace folder {trace_dir} is not empty; choose a new --trace-dir")
            say(f"run {number} of 2, {steps} steps: {shlex.join(command)}")
            result = _run_traced(command, trace_dir, steps)
            if result.returncode != 0:
                tail = ["  " + line for line in _tail(result.stdout)]
                if number == 2:
                    return _report_failed_second_run(traces[0], trace_dir, result.returncode, tail)
                return Report(
                    ERROR, [f"run 1 failed with exit status {result.returncode}; the end of its output:", *tail]
                )
            traces.append(read_trace(trace_dir))
        return compare_traces(traces[0], traces[1], steps)


def _report_failed_second_run(first: dict[int, list[dict]], trace_dir: Path, status: int, tail: list[str]) -> Report:
    """Run 2 failed after run 1 succeeded: compare what run 2 traced before it failed with the same
    steps of run 1, so that a run that diverged and then failed (a loss gone to NaN) shows where it
    diverged; ``DIFFERENT`` when it did, ``ERROR`` when the steps it traced match."""
    try:
        second = read_trace(trace_dir)
    except CommandError:
        second = {}  # a run killed while it wrote leaves a broken last line: its failure is the report
    common = {rank: min(len(first[rank]), len(records)) for rank, records in second.items() if rank in first}
    difference = _first_difference(
        {rank: first[rank][:length] for rank, length in common.items()},
        {rank: second[rank][:length] for rank, length in common.items()},
    )
    if difference is not None:
        return Report(
            DIFFERENT, [*difference, f"run 2 then failed with exit status {status}; the end of its output:", *tail]
        )
    lines = [f"run 2 failed with exit status {status}; the end of its output:", *tail]
    traced = max(common.values(), default=0)
    if traced:
        lines.append(f"what run 2 traced before it failed ({traced} records) matches run 1's trace")
    return Report(ERROR, lines)


def _run_traced(command: Sequence[str], trace_dir: Path, steps: int) -> subprocess.CompletedProcess:
    try:
        trace_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot make trace folder {trace_dir}: {error.strerror}") from None
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
    """Read the ``rank-R.jsonl`` files of one traced run: ``{rank: [one record per step]}``.

    Raises:
        CommandError: a file is not JSON lines, or a record is not what
            :class:`repro.trace.StepTracer` writes (see :func:`_check_record`).
    """
    trace: dict[int, list[dict[str, Any]]] = {}
    for path in directory.glob("rank-*.jsonl"):
        match = re.fullmatch(r"rank-(\d+)\.jsonl", path.name)
        if match is None:
            continue
        try:
            records = read_metrics(path)
        except RunFileError as error:
            raise CommandError(f"not a valid trace: {error}") from None
        for number, record in enumerate(records, start=1):
            problem = _check_record(record)
            if problem:
                raise CommandError(f"not a valid trace: {path}, record {number}: {problem}")
        trace[int(match[1])] = records
    return dict(sorted(trace.items()))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record: dict[str, Any]) -> str | None:
    """What is wrong with one trace record, or ``None``: a ``step`` (an integer from 0), a ``loss``
    (a number, or null at step 0), ``tensors`` (name: digest) and ``stats`` ([sum, norm] for each
    tensor). A command may write its own trace: the comparison must not trip on one."""
    step, loss, tensors, stats = (record.get(key) for key in ("step", "loss", "tensors", "stats"))
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' must be an integer from 0, got {short(step)}"
    if not (_is_number(loss) or loss is None):
        return f"'loss' must be a number or null, got {short(loss)}"
    if not isinstance(tensors, dict) or not all(isinstance(digest, str) for digest in tensors.values()):
        return "'tensors' must map each tensor name to its digest"
    if not isinstance(stats, dict) or not all(
        isinstance(stats.get(name), list) and len(stats[name]) == 2 and all(map(_is_number, stats[name]))
        for name in tensors
    ):
        return "'stats' must map each tensor name to [sum, norm], two numbers"
    return None


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
        if empty and number == 2 and first.get(empty[0]):
            # Run 1 trained; run 2, started in the same output folder, found its checkpoints and had nothing left.
            raise CommandError(
                f"run 2 traced no step on rank {empty[0]}, where run 1 traced {len(first[empty[0]])} records: it "
                "probably resumed from run 1's output; a traced script must write into tracer.run_dir (a fresh "
                "folder per run) and stop after tracer.steps steps"
            )
        if empty:
            raise CommandError(f"run {number} traced no step on rank {empty[0]}")
    if set(first) != set(second):
        raise CommandError(f"the runs traced different ranks: {sorted(first)} and {sorted(second)}")

    difference = _first_difference(first, second)
    if difference is None:
        traced = sum(1 for record in first[min(first)] if record["step"] > 0)  # step 0: the initial state
        ranks = f"{len(first)} ranks" if len(first) > 1 else "1 rank"
        lines = [f"bitwise reproducible over {traced} steps ({ranks}; every parameter and buffer after every step)"]
        if traced < steps:
            lines.append(f"note: the command stopped after {traced} of the {steps} steps asked for")
        return Report(SAME, lines)
    return Report(DIFFERENT, difference)


def _first_difference(first: dict[int, list[dict]], second: dict[int, list[dict]]) -> list[str] | None:
    """The lines naming the first record at which two traces of the same ranks differ, and how
    on each rank that differs there; ``None`` when none does."""
    first_difference = {
        rank: index for rank in first if (index := _first_differing_record(first[rank], second[rank])) is not None
    }
    if not first_difference:
        return None
    index = min(first_difference.values())
    ranks = [rank for rank, at in first_difference.items() if at == index]
    step = _step_label(first[ranks[0]], second[ranks[0]], index)
    if step == 0:
        lines = ["not reproducible: the initial state differs (before step 1)"]
    else:
        lines = [f"not reproducible: the runs first differ at step {step} (identical before it)"]
    for rank in ranks:
        lines += _describe_difference(rank, first[rank], second[rank], index)
    return lines


def _first_differing_record(first: list[dict], second: list[dict]) -> int | None:
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a.get("step") != b.get("step") or a.get("tensors") != b.get("tensors"):
            return index
        if not same_number(a.get("loss"), b.get("loss")):
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
    if same_number(loss_a, loss_b):
        if loss_a is not None:  # None: the initial state, before any step
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
