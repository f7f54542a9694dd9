"""A cache of decoded image folders: a folder is decoded once, and later runs read its arrays.

Decoding CIFAR-10's 60,000 JPEGs one by one with PIL took 18-21 s on the 2-core
machine of BENCHMARKS.md (section 10), and reading their cache entry 3 s, most
of it hashing the files. The speedrun recipe trains in under 4 s on a GPU, so
without the cache most of a run's wall time would be decoding, again at every
run and on every rank.

An entry is found by content, never by name or date: its key is a SHA-256 over
every image file's path in the folder, its bytes, the class list, and the
decoder (:data:`DECODE_VERSION`, this project's decoding steps, and the versions
of PIL and of its image libraries). A file changed, added, removed or renamed,
or another PIL, makes another key, so a run never trains on stale arrays. An
entry also holds a checksum of its arrays (cifar/data.py's: built on the
dataset fingerprint that the run records anyway, and on the arrays' types and
shapes, which the fingerprint's bytes do not show), checked when it is read: one
that fails the check, or cannot be read, is decoded again and replaced.

Entries are written atomically (a temporary file, then a rename): a run killed
while writing leaves at most a temporary file, never a partial entry, and
ranks that write the same entry at once each replace it with the same bytes.
A folder that cannot be written costs the cache, not the run: :func:`store`
reports why and the run goes on with the decoded arrays. Entries are never
deleted; delete the folder to reclaim the space (CIFAR-10: 185 MB an entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Change this whenever decoding changes (cifar/data.py's _read_image: conversion,
# resizing, size) or what an entry holds (_ARRAYS): entries of the old code then
# no longer match, and are never read as the new code's. 3: 16-bit grey images keep
# their top 8 bits (version 2 clipped them at 255), 32-bit ones are refused. 4: a channel's
# stored std is at least one grey level (version 3 stored 0 for a constant channel).
DECODE_VERSION = 4
AUTO = "auto"  # the default folder: $XDG_CACHE_HOME/repro, else ~/.cache/repro
OFF = "none"
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "mean", "std")


def cache_dir(setting: str) -> Path | None:
    """The folder named by the ``data_cache`` setting: ``auto`` (the user's cache folder),
    ``none`` (no cache: None), or a path. Call it where the run starts: it reads
    ``XDG_CACHE_HOME`` and the home folder of the environment then. Raises ``ValueError``
    for an empty setting or a home folder that cannot be found."""
    if not setting.strip():
        raise ValueError(f"data_cache must be {AUTO}, {OFF} or a folder, got an empty value")
    if setting == OFF:
        return None
    try:
        if setting == AUTO:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            return Path(base) / "repro"
        return Path(setting).expanduser()
    except RuntimeError as error:  # a home folder that cannot be found: ~user of no user, or no HOME
        raise ValueError(f"data_cache {setting!r}: {str(error).rstrip('.')}; give a folder, or none") from None


def _decoder() -> bytes:
    """What decides the pixels besides the files: this project's decoding and PIL's libraries."""
    from PIL import __version__, features

    libraries = [f"{name}={features.version(name)}" for name in ("jpg", "libjpeg_turbo", "zlib", "webp", "libtiff")]
    return f"decode={DECODE_VERSION};pillow={__version__};{';'.join(libraries)}".encode()


class FolderHash:
    """The key of a folder's entry, built file by file: SHA-256 over the decoder, the classes,
    and each file's path under ``root`` and bytes, in the order :meth:`add` is called.

    A caller that decodes a file hashes the very bytes it decodes (:meth:`add`, then decode
    them): a file replaced between two reads can then never file its new pixels under its
    old bytes' key.
    """

    def __init__(self, root: Path, classes: list[str]) -> None:
        self._digest = hashlib.sha256(_decoder())
        # Names as the file system holds them: os.fsencode keeps names that are not UTF-8.
        self._digest.update(b"\0".join(os.fsencode(name) for name in classes) + b"\0\0")
        self._depth = len(root.parts)

    def add(self, path: Path, content: bytes) -> None:
        """Hash the next file: ``path`` (its path under root names it) and its bytes ``content``."""
        name = os.fsencode("/".join(path.parts[self._depth :]))  # its path under root; relative_to() is slower
        # Lengths first: no two listings of names and bytes hash the same stream.
        self._digest.update(len(name).to_bytes(8, "little") + name + len(content).to_bytes(8, "little"))
        self._digest.update(content)

    def hexdigest(self) -> str:
        """The key of the files added so far."""
        return self._digest.hexdigest()


def folder_key(root: Path, classes: list[str], files: Iterable[Path]) -> str:
    """The :class:`FolderHash` key of ``files``, in order: the entry to look for before decoding.

    Reads every file; an ``OSError`` reading one propagates to the caller, which names the file.
    """
    key = FolderHash(root, classes)
    for path in files:
        key.add(path, path.read_bytes())
    return key.hexdigest()


def entry_path(folder: Path, key: str) -> Path:
    """Where the entry of ``key`` lives in ``folder``."""
    return folder / f"imagefolder-{key}.npz"


def load(folder: Path, key: str) -> tuple[dict[str, np.ndarray], str] | None:
    """The arrays of entry ``key`` (train_images, train_labels, test_images, test_labels, mean,
    std) and the checksum stored with them, or None when there is none or it cannot be read.
    The caller compares the checksum with its own of the arrays before it uses them."""
    path = entry_path(folder, key)
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {name: entry[name] for name in _ARRAYS}, str(entry["checksum"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, or damaged
        return None


def store(folder: Path, key: str, arrays: dict[str, np.ndarray], checksum: str) -> str | None:
    """Write entry ``key`` (``arrays`` and their ``checksum``) atomically; returns None, or why
    it could not be written (the run goes on)."""
    path = entry_path(folder, key)
    # Named by host and process: ranks on hosts that share the folder never write one file.
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as file:
            np.savez(file, checksum=np.array(checksum), **{name: arrays[name] for name in _ARRAYS})
        temporary.replace(path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return f"{error.strerror or error}: {error.filename or folder}"
    return None
