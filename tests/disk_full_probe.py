"""Run train.py in this process on a disk that is full for the files of one name.

    python tests/disk_full_probe.py PATTERN TRAIN_ARGS...

An audit hook (``sys.addaudithook``) makes every opening for writing of a file
whose name matches PATTERN (``fnmatch``: ``metrics.jsonl`` for an append to
it, ``.config.yaml.*`` for the temporary file an atomic write of config.yaml
goes through) fail as the kernel fails it once the disk is full (``OSError``
ENOSPC, naming the file). Every other file is written as usual, so the writes
before it (the checkpoints) succeed. Then train.py runs as ``__main__`` with
TRAIN_ARGS, its exit status this process's. Set ``PYTHONHASHSEED``: train.py
would otherwise start itself again, without the hook.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRITING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


def main() -> None:
    pattern, arguments = sys.argv[1], sys.argv[2:]

    def disk_full_for_name(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        opened = Path(os.fsdecode(args[0])).name
        mode, flags = args[1], args[2]
        writing = any(letter in mode for letter in "wax+") if isinstance(mode, str) else bool(flags & WRITING_FLAGS)
        if writing and fnmatch.fnmatchcase(opened, pattern):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(args[0]))

    sys.addaudithook(disk_full_for_name)
    sys.argv = [str(REPO / "train.py"), *arguments]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
