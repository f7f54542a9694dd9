"""``python -m repro``: verify, compare and reproduce runs, and show the environment.

    python -m repro verify [--steps N] -- accelerate launch train.py --seed 2333
    python -m repro compare runs/a runs/b
    python -m repro reproduce runs/a [--script train.py] [--output-dir DIR]
    python -m repro env [--json]

A thin command line over :mod:`repro.verify`, :mod:`repro.compare`,
:mod:`repro.reproduce` and :mod:`repro.fingerprint`: it parses the arguments,
runs the check, prints its report and exits with its status: 0 reproducible or
identical, 1 different, 2 could not tell (a failed run, a missing file).
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from pathlib import Path

from repro.compare import compare_runs
from repro.fingerprint import environment_report
from repro.report import CommandError, Report
from repro.reproduce import DEFAULT_SCRIPT, reproduce_run
from repro.verify import verify_command


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m repro", description="Check that training runs reproduce.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="run a training command twice and compare every step",
        description="Run a training command twice with per-step tracing and report the first step and "
        "tensors that differ, or that the runs are bitwise identical.",
    )
    verify.add_argument("--steps", type=_positive_int, default=20, help="optimizer steps to trace (default: 20)")
    verify.add_argument(
        "--trace-dir",
        type=Path,
        help="keep both traces and run outputs under DIR/run-1 and DIR/run-2 (default: a temporary folder)",
    )
    verify.add_argument(
        "training_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the training command"
    )

    compare = commands.add_parser("compare", help="compare two finished run folders")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)

    reproduce = commands.add_parser("reproduce", help="re-run a finished run from its manifest and check its weights")
    reproduce.add_argument("manifest", type=Path, help="the run's manifest.json (or its run folder)")
    reproduce.add_argument(
        "--script",
        type=Path,
        default=DEFAULT_SCRIPT,
        help="the training script to re-run, given --config FILE (default: train.py in the current folder)",
    )
    reproduce.add_argument("--output-dir", type=Path, help="a new folder for the re-run (default: a temporary one)")

    env = commands.add_parser("env", help="print the environment fingerprint and determinism settings")
    env.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def run(arguments: argparse.Namespace) -> Report:
    say = partial(print, flush=True)
    if arguments.command == "verify":
        return verify_command(arguments.training_command, arguments.steps, trace_root=arguments.trace_dir, say=say)
    if arguments.command == "compare":
        return compare_runs(arguments.run_a, arguments.run_b)
    if arguments.command == "reproduce":
        return reproduce_run(arguments.manifest, arguments.output_dir, script=arguments.script, say=say)
    return environment_report(arguments.json)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "verify":
        command = arguments.training_command
        # argparse keeps the "--" that separates the training command from verify's own options.
        arguments.training_command = command[1:] if command[:1] == ["--"] else command
        if not arguments.training_command:
            parser.error("verify needs a training command after --, e.g. -- python train.py --config configs/demo.yaml")
    try:
        report = run(arguments)
    except CommandError as error:
        print(f"python -m repro {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m repro {arguments.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    print("\n".join(report.lines), flush=True)
    return report.status


def exit_on_sigterm(number: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit, which unwinds through the checks' ``finally`` blocks:
    the training run they started is stopped, their temporary folders removed."""
    raise SystemExit(128 + number)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sys.exit(main())
