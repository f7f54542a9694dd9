"""Experiment trackers: which one a run logs to, and the per-step values it logs.

``--log-with`` picks one of accelerate's trackers (tensorboard, wandb, mlflow,
aim) or ``none``. The per-step training loss and learning rate wait in a
:class:`StepLog` until the loop synchronises with the device anyway (an epoch
end, a checkpoint), so logging them costs the step loop no wait for the GPU.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import is_aim_available, is_mlflow_available, is_tensorboard_available, is_wandb_available

from cifar.config import ConfigError

# Each tracker: whether accelerate can use it here, and what to install when it cannot.
TRACKERS: dict[str, tuple[Callable[[], bool], str]] = {
    "tensorboard": (is_tensorboard_available, "pip install tensorboard"),
    "wandb": (is_wandb_available, "pip install wandb"),
    "mlflow": (is_mlflow_available, "pip install mlflow"),
    "aim": (is_aim_available, "pip install 'aim<4'"),  # accelerate's tracker refuses aim 4
}
DEFAULT_TRACKER = "tensorboard"
TENSORBOARD_DIR = "tensorboard"  # the run folder's sub-folder of event files


class TrackerUnavailableError(ConfigError):
    """``--log-with`` names a tracker whose package is not installed: one line, exit status 2."""


def choose_tracker(requested: str) -> tuple[str | None, str | None]:
    """The tracker to hand accelerate (None: none), and a one-line note to print, if any.

    Call before creating the Accelerator: accelerate drops a tracker whose
    package is missing without a word. The default, tensorboard, is optional
    (``python train.py`` must run without it): missing, it is skipped with a
    note. Any other tracker that is missing was asked for by name, and raises
    :class:`TrackerUnavailableError`.
    """
    if requested == "none":
        return None, None
    available, install = TRACKERS[requested]
    if available():
        return requested, None
    if requested == DEFAULT_TRACKER:
        return None, f"tensorboard is not installed: metrics go to metrics.jsonl only ({install}, or --log-with none)"
    raise TrackerUnavailableError(
        f"--log-with {requested} needs the {requested} package, which is not installed: {install}"
    )


def project_dir(tracker: str | None, run_dir: Path) -> Path | None:
    """accelerate's ``project_dir`` for ``tracker``: the run folder for tensorboard's event files;
    the working directory for aim's repository, aim's own default; None for wandb and mlflow,
    which keep their data where their own settings say (mlflow: its tracking URI)."""
    if tracker == "tensorboard":
        return run_dir
    return Path.cwd() if tracker == "aim" else None


def init_trackers(accelerator: Accelerator, run_dir: Path, resumed_step: int) -> None:
    """Start the tracker ``accelerator`` was created with, if any; call once, after the resume, on every process.

    A run resumed at step ``resumed_step`` logs again every step after it, so
    tensorboard hides what an earlier attempt logged from step
    ``resumed_step + 1`` on (``SummaryWriter``'s ``purge_step``): each step
    shows once, with the values of the run that went on. wandb, mlflow and
    aim start a new run of the tracker, named after the run folder, at each
    invocation.
    """
    if not accelerator.log_with:
        return
    tracker = str(accelerator.log_with[0])
    if tracker == "tensorboard":
        project, kwargs = TENSORBOARD_DIR, {"purge_step": resumed_step + 1}
    else:
        # wandb's project and mlflow's and aim's experiment are "cifar"; the tracker's run is named after the run.
        project, kwargs = {
            "wandb": ("cifar", {"name": run_dir.name}),
            "mlflow": ("cifar", {"run_name": run_dir.name}),
            "aim": (run_dir.name, {"experiment": "cifar"}),  # accelerate names aim's run after the project
        }[tracker]
    try:
        accelerator.init_trackers(project, init_kwargs={tracker: kwargs})
    except OSError as error:
        drop_trackers(accelerator, error)


def log(accelerator: Accelerator, values: dict[str, float], step: int) -> None:
    """``accelerator.log``, except that a tracker that cannot write (a full disk, an unwritable
    folder) is dropped with one line instead of ending the run (:func:`drop_trackers`)."""
    try:
        accelerator.log(values, step=step)
    except OSError as error:
        drop_trackers(accelerator, error)


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers (their last writes), dropping them with one line if that fails;
    call before ``accelerator.end_training()``, which then has no tracker left to close."""
    trackers, accelerator.trackers = accelerator.trackers, []
    for tracker in trackers:
        try:
            tracker.finish()
        except OSError as error:
            drop_trackers(accelerator, error)


def drop_trackers(accelerator: Accelerator, error: OSError) -> None:
    """Stop logging to the trackers after ``error``, with one line on stderr.

    A tracker is a copy of metrics.jsonl for viewing: a failure to write it must
    not stop the training, which would lose the steps since the last checkpoint.
    Only the main process holds trackers, so the line is printed once.
    """
    trackers, accelerator.trackers = accelerator.trackers, []
    for tracker in trackers:
        # Its pending writes fail as its last one did; one whose start failed has no writer to close.
        with contextlib.suppress(OSError, AttributeError):
            tracker.finish()
    names = ", ".join(str(name) for name in accelerator.log_with) or "tracker"
    print(f"{names} stopped logging ({error}): metrics go to metrics.jsonl only; training goes on", file=sys.stderr)


class StepLog:
    """Per-step training loss and learning rate, held until :meth:`flush` logs them.

    The losses stay on the device (0-d tensors) and the learning rates on the
    host (the scheduler's floats), so :meth:`record` never makes the host wait
    for the GPU; :meth:`flush`, called where the loop waits anyway, reads them
    all at once. Flushing before each checkpoint keeps what a tracker holds
    from running ahead of what a resume restores.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.lrs: list[float] = []

    def record(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Keep optimizer step ``step``'s loss on this process's batch and the learning rate it applied."""
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)

    def flush(self, accelerator: Accelerator) -> None:
        """Log the held steps as ``step/train_loss`` (the mean over processes) and ``step/lr``.

        A collective: call it on every process at the same point of the loop.
        """
        if not self.steps:
            return
        losses = accelerator.reduce(torch.stack(self.losses), reduction="mean").tolist()
        for step, loss, lr in zip(self.steps, losses, self.lrs, strict=True):
            log(accelerator, {"step/train_loss": loss, "step/lr": lr}, step)
        self.steps, self.losses, self.lrs = [], [], []
