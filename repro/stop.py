"""Stopping a run gracefully: after the current step, on every rank at once.

Cluster schedulers send SIGTERM (SLURM can be told to send another signal
first, often SIGUSR1) some time before they kill a job, and a user stops a run
with Ctrl-C (SIGINT) or by closing its terminal (SIGHUP); ``JOB_STOP_SIGNALS``
names them all. Python's defaults end the process at once, mid-step, and whatever
the last checkpoint missed is lost. :class:`GracefulStop` turns these signals
into a request that the training loop reads between steps, so the run can
finish its step, write a checkpoint and exit, to be resumed exactly.

With several processes the signal may reach one rank only (a scheduler that
signals one node, a user who kills one process), while all ranks must stop at
the same step, or the ones that go on wait forever in their next collective.
So the ranks agree after every step, over a CPU (gloo) group of their own:
reading an all-reduce's result on the GPU would make the host wait for the
step it just queued, on every step.

    with GracefulStop() as stop:
        for batch in loader:
            train_step(batch)
            if stop.agreed():
                save_checkpoint()
                break

A DataLoader's workers get the signal too when it goes to the whole process
group: give them :class:`IgnoreStopSignals` as their ``worker_init_fn``.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
# What stops a job: a scheduler's SIGTERM (SLURM's scancel and time limit), the signal it can be
# told to send first (`#SBATCH --signal=USR1@120`), Ctrl-C, and a closed terminal (SIGHUP).
JOB_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
# Backends whose all-reduce runs on CPU tensors, without a device synchronisation.
_CPU_BACKENDS = ("gloo", "mpi")


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn`` with which each worker ignores the stop signals until
    its training process exits, then runs the ``worker_init_fn`` it wraps (a
    :class:`repro.loader.WorkerSeeder`).

    When: create it in the training process and pass it as ``worker_init_fn=`` to every
    DataLoader with workers in a loop that stops with :class:`GracefulStop`. Why: a scheduler
    or a terminal signals the whole process group, workers included. torch's workers die of
    SIGTERM (and a worker dies of any other stop signal by default), and the main process
    then raises "DataLoader worker is killed by signal" mid-step, before it can checkpoint.
    Ignoring them, the workers go on serving batches until the main process stops after its
    step and shuts them down.

    What it sets: in the training process, a flag in shared memory and an exit handler
    (``atexit``) that raises it; in each worker, a handler for ``signals`` that ignores them
    while the flag is down and ends the worker (status 0) once it is up. Why the flag: at
    interpreter exit Python's multiprocessing ends the workers of a DataLoader still alive
    (held, say, by a traceback that a library keeps) with SIGTERM, then waits for them; a
    worker that ignored that signal too would make the exit wait forever. The handler is
    the process's, not a thread's: a signal reaches it whichever thread of the worker the
    kernel hands it to (a spawned worker has its libraries' threads before this runs).

    Args:
        init: the ``worker_init_fn`` to run after, or None.
        signals: the signals to ignore: those the loop's :class:`GracefulStop` catches.
    """

    def __init__(self, init: Callable[[int], None] | None = None, signals: Sequence[int] = JOB_STOP_SIGNALS) -> None:
        self.init = init
        self.signals = tuple(signal.Signals(number) for number in signals)
        # Shared memory without a lock: a worker of any start method can read it.
        self.training_exits = multiprocessing.RawValue(ctypes.c_bool, False)
        # Registered after multiprocessing's own exit handler, so it runs before that one.
        atexit.register(_raise_flag, self.training_exits)

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, self._on_stop_signal)
        if self.init is not None:
            self.init(worker_id)

    def _on_stop_signal(self, number: int, frame: FrameType | None) -> None:
        if self.training_exits.value:
            # Status 0: torch's SIGCHLD handler in the training process reports any other
            # end of a worker whose DataLoader is alive as a failure.
            os._exit(0)


def _raise_flag(flag: Any) -> None:
    flag.value = True


class GracefulStop:
    """A context manager that turns signals into a request to stop, agreed across ranks.

    What it sets: on entry, a handler for each of ``signals`` (SIGTERM and
    SIGINT by default) that records the signal instead of ending the process;
    with several processes and no ``group`` given, a new gloo process group of
    all ranks. On exit, also when the block raises, it puts back the handlers
    that were installed before and destroys the group it created (a handler
    installed from C, which Python cannot reinstall, is replaced by the default
    one).

    When: around the training loop, entered on every rank at the same point
    (creating the group is a collective), and from the main thread (Python
    runs signal handlers there only). Call :meth:`agreed` at the same point of
    every step on every rank, and stop when it returns a signal.

    Why a context manager: handlers left installed after training would keep
    swallowing Ctrl-C and SIGTERM in whatever the program does next, such as
    an evaluation or a second run in the same process.

    Args:
        group: the CPU (gloo or MPI) process group over which the ranks agree.
            ``None`` creates one when ``torch.distributed`` is initialised with
            more than one process, and agrees with no one otherwise.
        signals: the signals that request a stop; SIGKILL and SIGSTOP cannot
            be caught and raise ``ValueError``, as does an empty sequence.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    ) -> None:
        if isinstance(signals, int) or not signals:
            raise ValueError(f"signals must be a non-empty sequence of signals, got {signals!r}")
        # Each once: a second installation would save this object's own handler as the one to put back.
        self.signals = tuple(dict.fromkeys(signal.Signals(number) for number in signals))
        uncatchable = [number.name for number in self.signals if number in _UNCATCHABLE]
        if uncatchable:
            raise ValueError(f"{', '.join(uncatchable)} cannot be caught; a process cannot stop gracefully on it")
        if group is not None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("a group was given but torch.distributed is not initialised")
            backend = str(dist.get_backend(group))
            if not any(name in backend for name in _CPU_BACKENDS):
                raise ValueError(
                    f"GracefulStop agrees over CPU tensors and needs a gloo or MPI group, got a {backend!r} one: "
                    "pass torch.distributed.new_group(backend='gloo')"
                )
        self.group = group
        self.received: signal.Signals | None = None  # the last signal that reached this process
        self._own_group: dist.ProcessGroup | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> GracefulStop:
        if self._previous:
            raise RuntimeError("this GracefulStop is already active; create one per with block")
        if self.group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._own_group = dist.new_group(backend="gloo")
        self.received = None
        try:
            for number in self.signals:
                previous = signal.getsignal(number)
                signal.signal(number, self._record)  # raises outside the main thread
                self._previous[number] = previous
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if self._own_group is not None:
            dist.destroy_process_group(self._own_group)
            self._own_group = None

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number)

    def agreed(self) -> signal.Signals | None:
        """The signal that reached any rank, the same on every rank; None if none did.

        When several ranks received different signals, the one with the highest
        number wins. With a group this is one small all-reduce on the CPU, so
        call it at the same point on every rank, or the ranks wait for each
        other; without one it only reads :attr:`received`.

        Raises:
            RuntimeError: called outside the ``with`` block.
        """
        if not self._previous:
            raise RuntimeError("GracefulStop.agreed() is called inside its with block only")
        group = self.group if self.group is not None else self._own_group
        if group is None:
            return self.received
        number = torch.tensor([self.received or 0])
        dist.all_reduce(number, op=dist.ReduceOp.MAX, group=group)
        agreed = int(number.item())
        return signal.Signals(agreed) if agreed else None
