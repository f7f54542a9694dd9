"""One run at a time in a run folder: an advisory lock held by the process that writes it.

Two runs writing one folder interleave their metrics and checkpoints and prune
each other's files. The lock is a POSIX record lock (``fcntl.lockf``) on
``.repro-run.lock`` in the run folder, taken by the main process before it
writes or deletes anything there. The lock file names its holder (pid and
host), so a refused run says who holds the folder.

Why ``lockf`` and not ``flock``: a ``flock`` lock belongs to the open file and
is shared with every child forked after it, and the DataLoader forks its
workers. Killed with ``kill -9``, a run would then keep its folder locked until
its workers noticed. A ``lockf`` lock belongs to the process alone and vanishes
with it, however it ends, so a killed run never leaves its folder stuck.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import warnings
from pathlib import Path

LOCK_NAME = ".repro-run.lock"

# The lock files this process holds, by (device, inode). A POSIX lock is dropped
# when the process closes *any* descriptor of the file, so a folder taken twice
# by one process (bench/loop_vs_handwritten.py calls train.main in a loop) must
# keep its first descriptor rather than open and later close a second one.
_held: dict[tuple[int, int], int] = {}

# Errors of file systems that do not implement POSIX locks (some network mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunFolderInUseError(Exception):
    """Another process holds the run folder: reported as one line, exit status 2."""


def lock_run_dir(run_dir: Path) -> None:
    """Take the run folder's lock for the rest of this process's life, or raise :class:`RunFolderInUseError`.

    When: on the main process only, after the folder exists and before anything
    is written into it or deleted from it. The lock is never released
    explicitly: the process's exit releases it, on every path a run can end by.
    Raises ``OSError`` if the lock file cannot be created (a read-only folder) or
    is not a regular file.
    """
    path = run_dir / LOCK_NAME
    with contextlib.suppress(FileNotFoundError):
        if _identity(path.stat()) in _held:
            return
    try:
        # Never through a link: a run folder one was sent could point its lock file at any file of
        # the user's, which the holder's pid would overwrite.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"its lock file {LOCK_NAME} is a symbolic link") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, f"its lock file {LOCK_NAME} is not a regular file")
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno in (errno.EACCES, errno.EAGAIN):
            raise RunFolderInUseError(f"run folder {run_dir} is in use by {_holder(path)}") from None
        if error.errno in _NO_LOCKS:
            warnings.warn(
                f"cannot lock run folder {run_dir} ({error.strerror}): nothing stops a second run "
                "from writing it at the same time",
                stacklevel=2,
            )
            return
        raise
    _held[_identity(os.fstat(descriptor))] = descriptor
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, holder + b"\n", 0)


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says: ``pid N on host H``.

    The holder writes the file just after taking the lock, so in that instant
    the file may still be empty or name an earlier holder that has ended.
    """
    try:
        holder = json.loads(path.read_bytes()[:1024])
        return f"pid {int(holder['pid'])} on host {str(holder['host'])[:255]}"
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (it has not yet written its pid)"
