"""Rank and world size, before and after the process group exists.

Seeds must be derived per rank before ``torch.distributed`` is initialised
(the DataLoader and the model may be built first), so these functions fall back
on the variables that launchers set. They never initialise anything.
"""

from __future__ import annotations

import os

# (rank variable, world-size variable) in order of precedence. torchrun and
# accelerate set RANK/WORLD_SIZE; SLURM and Open MPI set their own.
_LAUNCHER_VARIABLES = (
    ("RANK", "WORLD_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
)


class LauncherVariableError(ValueError):
    """A launcher variable (``RANK``, ``SLURM_NTASKS``, ...) holds something other than an integer.

    Raised by the functions below when they read it: a mistake in the job's
    environment, which a program reports as one line rather than a traceback.
    """


def _initialised_group() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def leave_process_group() -> None:
    """Destroy this process's process groups if it formed a gloo one; otherwise do nothing.

    When: on the way out of a script that may have formed a group, on every path,
    errors included (``accelerator.end_training()`` does it at the end of a run
    that finished). Why: a process that exits with a gloo group alive can abort
    at interpreter shutdown ("terminate called without an active exception",
    SIGABRT), which replaces its exit status; torch's documentation asks for the
    groups to be destroyed before exit. An NCCL group is left alone: destroying
    it while another rank still waits in a collective can hang, and a script on
    its way out after an error cannot know that every rank stopped too.
    """
    if _initialised_group():
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            dist.destroy_process_group()


def _read_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LauncherVariableError(f"environment variable {name} must be an integer, got {value!r}") from None


def get_rank() -> int:
    """Return this process's global rank: the process group's if initialised, else
    the first launcher variable set (``RANK``, ``SLURM_PROCID``,
    ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``), else 0."""
    if _initialised_group():
        import torch.distributed as dist

        return dist.get_rank()
    for rank_var, _ in _LAUNCHER_VARIABLES:
        rank = _read_int(rank_var)
        if rank is not None:
            return rank
    return 0


def get_world_size() -> int:
    """Return the number of processes: the process group's if initialised, else the
    world-size variable that belongs to the first rank variable set, else 1."""
    if _initialised_group():
        import torch.distributed as dist

        return dist.get_world_size()
    return launcher_world_size() or 1


def launcher_world_size() -> int | None:
    """Return the world size a launcher declared in the environment, or ``None``.

    Compare it with the world size of the process group actually formed: a
    mismatch means processes that each believe they are alone.
    """
    declared = declared_world_size()
    return None if declared is None else declared[1]


def declared_world_size() -> tuple[str, int] | None:
    """Return the world-size variable a launcher set and its value, as :func:`launcher_world_size`
    reads it (``("SLURM_NTASKS", 4)``), or ``None``.

    For an error to name what it read: a variable may come from elsewhere than the
    launcher of this process (Slurm sets ``SLURM_PROCID`` and ``SLURM_NTASKS`` in a
    batch script's own environment, where one process runs).
    """
    for rank_var, world_var in _LAUNCHER_VARIABLES:
        if _read_int(rank_var) is not None:
            world_size = _read_int(world_var)
            return None if world_size is None else (world_var, world_size)
    return None


def get_local_rank() -> int:
    """Return the rank within this node (``LOCAL_RANK``, ``SLURM_LOCALID``,
    ``OMPI_COMM_WORLD_LOCAL_RANK``), else 0."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        value = _read_int(name)
        if value is not None:
            return value
    return 0
