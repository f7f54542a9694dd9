"""Per-step traces of a training run, for the run-twice verifier.

``python -m repro verify -- COMMAND`` runs COMMAND twice with
``REPRO_TRACE_DIR`` and ``REPRO_TRACE_STEPS`` set. A training loop that calls
:meth:`StepTracer.record` after each optimizer step then writes, per rank, one
JSON line per step: the loss, the SHA-256 of every parameter and buffer, and
their sums and norms.
Comparing the two traces finds the first step and the first tensor that
differ. Without the variables, :meth:`StepTracer.from_environment` returns
``None`` and tracing costs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from repro.weights import tensor_digests

TRACE_DIR_VARIABLE = "REPRO_TRACE_DIR"
TRACE_STEPS_VARIABLE = "REPRO_TRACE_STEPS"


class StepTracer:
    """Writes ``rank-R.jsonl`` under the trace folder: one line per optimizer step."""

    def __init__(self, directory: Path, steps: int, rank: int) -> None:
        if steps < 1:
            raise ValueError(f"{TRACE_STEPS_VARIABLE} must be a positive integer, got {steps}")
        self.directory = directory
        self.steps = steps
        self.path = directory / f"rank-{rank}.jsonl"
        directory.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    @classmethod
    def from_environment(cls, rank: int) -> StepTracer | None:
        """The tracer the verifier asked for, or ``None`` when no trace is wanted.

        When: once, at start-up, after the rank is known.
        """
        directory = os.environ.get(TRACE_DIR_VARIABLE)
        if not directory:
            return None
        try:
            steps = int(os.environ.get(TRACE_STEPS_VARIABLE, "20"))
        except ValueError:
            raise ValueError(f"{TRACE_STEPS_VARIABLE} must be a positive integer") from None
        return cls(Path(directory), steps, rank)

    @property
    def run_dir(self) -> Path:
        """Where the traced run should write its outputs, apart from the user's runs."""
        return self.directory / "run"

    def record(self, step: int, loss: float, model: nn.Module) -> None:
        """Append ``step``'s loss and, for each tensor of ``model``'s state_dict, its
        digest and its sum and L2 norm in float64 (to size a difference)."""
        state = model.state_dict()
        stats = {
            name: [float(t.detach().double().sum()), float(t.detach().double().norm())] for name, t in state.items()
        }
        line = {"step": step, "loss": loss, "tensors": tensor_digests(state), "stats": stats}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")
