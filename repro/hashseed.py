"""Making ``PYTHONHASHSEED`` effective for the running program.

Python reads ``PYTHONHASHSEED`` once, when the interpreter starts: setting
``os.environ["PYTHONHASHSEED"]`` inside a running process changes nothing for
that process, so ``hash()`` of a string and the iteration order of a set of
strings still change from run to run. :func:`ensure_hash_seed` re-executes the
program with the variable set, in place (same process id, so launchers such as
``torchrun`` and ``accelerate launch`` keep tracking it). This module imports
nothing heavy, so an entry point can call it before importing torch and the
re-execution costs milliseconds.
"""

from __future__ import annotations

import os
import sys

DEFAULT_HASH_SEED = "0"


def hash_seed_is_fixed() -> bool:
    """Return True if this interpreter started with a fixed ``PYTHONHASHSEED``.

    ``sys.flags.hash_randomization`` is 0 only when ``PYTHONHASHSEED=0``;
    for other fixed values, the variable itself is the only record, so this
    also checks that it is a decimal integer (not ``random``) and was
    inherited rather than set after start-up.
    """
    if sys.flags.ignore_environment:  # python -E or -I: the variable is there, but hash() ignored it
        return False
    value = os.environ.get("PYTHONHASHSEED", "")
    return value.isdigit() and value == _STARTUP_HASH_SEED


_STARTUP_HASH_SEED = os.environ.get("PYTHONHASHSEED")


def ensure_hash_seed(value: str = DEFAULT_HASH_SEED) -> None:
    """Re-execute this program with ``PYTHONHASHSEED`` set, unless it already is.

    What it sets: ``PYTHONHASHSEED=value`` in the environment of the
    re-executed interpreter (and so of every child process, DataLoader
    workers included). A value the user exported already, if it is a fixed
    integer, is respected: the variable is what the manifest records.

    When: first thing in an entry point, before heavy imports and before any
    other process, thread or file is opened, because everything this process
    did so far is lost at the re-execution.

    Raises:
        ValueError: ``value`` is not a decimal integer in [0, 4294967295].
        RuntimeError: the program cannot be re-executed (an interactive
            session, or an embedded interpreter), or runs under ``python -E``
            or ``-I``, which ignore ``PYTHONHASHSEED`` in the re-executed one too.
    """
    if not value.isdigit() or int(value) > 4294967295:
        raise ValueError(f"PYTHONHASHSEED must be an integer in [0, 4294967295], got {value!r}")
    if sys.flags.ignore_environment:
        raise RuntimeError(
            "python -E and -I ignore PYTHONHASHSEED, so hash() of a string changes from run to run; run without them"
        )
    if hash_seed_is_fixed():
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv or sys.flags.interactive or not sys.executable:
        raise RuntimeError(
            "PYTHONHASHSEED is not set and this interpreter cannot be re-executed; "
            f"start it with PYTHONHASHSEED={value} in the environment"
        )
    os.environ["PYTHONHASHSEED"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv[1:]])
