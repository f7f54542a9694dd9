"""What a check of ``python -m repro`` returns: a :class:`Report`, or a :class:`CommandError`.

Every command (:mod:`repro.verify`, :mod:`repro.compare`, :mod:`repro.reproduce`,
the ``env`` report of :mod:`repro.fingerprint`) returns a :class:`Report`: the
lines to print and the exit status (``SAME`` 0, ``DIFFERENT`` 1, ``ERROR`` 2).
A problem that stops a check before it has a verdict raises :class:`CommandError`,
which ``python -m repro`` prints as one line with exit status 2.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

SAME, DIFFERENT, ERROR = 0, 1, 2


def _bounded_repr() -> reprlib.Repr:
    """A ``repr`` that stops after a few items, levels and characters (Python 3.11 has no keyword arguments)."""
    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxlist, bounded.maxtuple, bounded.maxdict, bounded.maxset = 2, 4, 4, 4, 4
    bounded.maxstring, bounded.maxlong, bounded.maxother = 60, 40, 60
    return bounded


_BOUNDED_REPR = _bounded_repr()


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, at a cost bounded whatever the value's size.

    Every error message that echoes a value it refuses (a config's, a checkpoint's,
    a seed) goes through it: a hostile or mistaken file must not make a huge line,
    nor a megabyte ``repr`` built only to be cut.
    """
    text = _BOUNDED_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CommandError(ValueError):
    """A problem that stops a check before it has a verdict: one line, exit status 2."""


@dataclass
class Report:
    """What a check found: ``lines`` to print and the exit ``status``
    (``SAME`` 0, ``DIFFERENT`` 1, ``ERROR`` 2)."""

    status: int
    lines: list[str]


def silent(line: str) -> None:
    """The default ``say`` of the checks: library callers who want no progress lines get none."""


def same_number(a: Any, b: Any) -> bool:
    """Equal, counting two NaNs as equal: a loss that diverged twice the same way reproduces."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
