"""Per-step traces of a training run, for the run-twice verifier.

``python -m repro verify -- COMMAND`` runs COMMAND twice with
``REPRO_TRACE_DIR`` and ``REPRO_TRACE_STEPS`` set. A training loop that calls
:meth:`StepTracer.record` after each optimizer step then writes, per rank, one
JSON line per step: the loss, the SHA-256 of every parameter and buffer, and
their sums and norms; :meth:`StepTracer.record_start`, called before the first
step, adds a line for the initial state (step 0, no loss).
Comparing the two traces finds the first step and the first tensor that
differ. Without the variables, :meth:`StepTracer.from_environment` returns
``None`` and tracing costs nothing.

A traced run must start afresh and train the same steps both times: write its
outputs (checkpoints above all) into :attr:`StepTracer.run_dir`, a fresh folder
per run, not the script's usual output folder, and stop after
:attr:`StepTracer.steps` steps. A script that resumes from its own output
folder would find run 1's checkpoints in run 2 and trace nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from repro.weights import tensor_digests

TRACE_DIR_VARIABLE = "REPRO_TRACE_DIR"
TRACE_STEPS_VARIABLE = "REPRO_TRACE_STEPS"
DEFAULT_TRACE_STEPS = 20


class TraceSettingError(ValueError):
    """A trace variable whose value cannot be used (not a positive step count, a folder that
    cannot be made): one line, which a training script prints as a usage error."""


class StepTracer:
    """Writes ``rank-R.jsonl`` under the trace folder: one line per optimizer step.

    A traced script writes its outputs into :attr:`run_dir` and stops after
    :attr:`steps` steps, in place of its usual output folder and length::

        tracer = StepTracer.from_environment(rank)
        run_dir, stop_at = (tracer.run_dir, tracer.steps) if tracer else (args.out, None)

    Each of the verifier's two runs gets a fresh ``run_dir``; a script that kept
    its own output folder would resume run 2 from run 1's checkpoints.
    """

    def __init__(self, directory: Path, steps: int, rank: int) -> None:
        if steps < 1:
            raise TraceSettingError(f"{TRACE_STEPS_VARIABLE} must be a positive integer, got {steps}")
        self.directory = directory
        self.steps = steps
        self.path = directory / f"rank-{rank}.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        except OSError as error:
            raise TraceSettingError(
                f"{TRACE_DIR_VARIABLE}={directory}: cannot write the trace there: {error.strerror}"
            ) from None

    @classmethod
    def from_environment(cls, rank: int) -> StepTracer | None:
        """The tracer the verifier asked for, or ``None`` when no trace is wanted.

        When: once, at start-up, after the rank is known.

        Raises:
            TraceSettingError: ``REPRO_TRACE_STEPS`` is not a positive integer, or the
                trace folder cannot be made or written (a file of that name, no permission).
        """
        directory = os.environ.get(TRACE_DIR_VARIABLE)
        if not directory:
            return None
        text = os.environ.get(TRACE_STEPS_VARIABLE, str(DEFAULT_TRACE_STEPS))
        try:
            steps = int(text)
        except ValueError:
            raise TraceSettingError(f"{TRACE_STEPS_VARIABLE} must be a positive integer, got {text[:40]!r}") from None
        return cls(Path(directory), steps, rank)

    @property
    def run_dir(self) -> Path:
        """Where the traced run should write its outputs, apart from the user's runs."""
        return self.directory / "run"

    def takeover_note(self) -> str:
        """One line for the training script to print when tracing replaces its output folder and
        length: a trace variable left exported in a shell must not redirect a run unannounced."""
        return (
            f"note: {TRACE_DIR_VARIABLE} is set (python -m repro verify): this run traces at most {self.steps} "
            f"steps into {self.run_dir}, not its configured output folder; unset {TRACE_DIR_VARIABLE} to train it"
        )

    def record_start(self, model: nn.Module) -> None:
        """Append the initial state of ``model`` as step 0, without a loss: called before the first
        step, it lets the verifier tell initial weights that differ from a first step that does."""
        self._write(0, None, model)

    def record(self, step: int, loss: float, model: nn.Module) -> None:
        """Append ``step``'s loss and, for each tensor of ``model``'s state_dict, its
        digest and its sum and L2 norm in float64 (to size a difference)."""
        self._write(step, loss, model)

    def _write(self, step: int, loss: float | None, model: nn.Module) -> None:
        state = model.state_dict()
        stats = {
            name: [float(t.detach().double().sum()), float(t.detach().double().norm())] for name, t in state.items()
        }
        line = {"step": step, "loss": loss, "tensors": tensor_digests(state), "stats": stats}
        with self.path.open("a") as file:
            file.write(json.dumps(line) + "\n")
