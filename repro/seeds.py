"""Seed derivation: one user seed, many independent named streams.

Every source of randomness in a run draws from its own stream, derived from the
user seed with :func:`derive_seed`. Streams are derived, never added: with
``seed + rank`` the seed 2333 at rank 1 would equal the seed 2334 at rank 0,
and two "independent" runs would share their randomness.

The derivation is ``numpy.random.SeedSequence`` over
``[seed, stream code, number of indices, *indices]``, where the stream code is
the first 32 bits of the SHA-256 of the stream's name. It is stable across
processes, platforms and Python versions (never Python's ``hash()``, which
changes with ``PYTHONHASHSEED``). The length prefix keeps ``("x", 1)`` and
``("x", 1, 0)`` apart.

For per-sample streams, where 6 µs of ``SeedSequence`` per sample is too much,
:func:`mix64` combines a per-epoch key (from :func:`derive_seed`) with the
sample index through the SplitMix64 finaliser: a bijection of the index for a
fixed key, so no two samples of an epoch share a seed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

MAX_USER_SEED = 2**32 - 1
_MASK64 = 2**64 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` if it is an integer in [0, 2**32 - 1], else raise ``ValueError``.

    ``bool`` is rejected although it is an ``int`` subclass: ``seed=True`` is
    always a mistake.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [0, {MAX_USER_SEED}], got {seed!r}")
    if not 0 <= int(seed) <= MAX_USER_SEED:
        raise ValueError(f"{name} must be in [0, {MAX_USER_SEED}], got {seed}")
    return int(seed)


@functools.lru_cache(maxsize=256)
def stream_code(stream: str) -> int:
    """Return the stable 32-bit code of a stream name (first 4 bytes of its SHA-256)."""
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream name must be a non-empty string, got {stream!r}")
    return int.from_bytes(hashlib.sha256(stream.encode("utf-8")).digest()[:4], "little")


def derive_seed(seed: int, stream: str, *indices: int, bits: int = 64) -> int:
    """Derive the seed of ``stream`` at ``indices`` from the user ``seed``.

    Args:
        seed: the user seed, an integer in [0, 2**32 - 1].
        stream: the stream's name, such as ``"order"`` or ``"worker"``.
        indices: non-negative integers below 2**32 that select one member of the
            stream, such as the epoch, or the rank and the worker id.
        bits: 64 (default; for ``torch.manual_seed`` and
            ``torch.Generator.manual_seed``) or 32 (for APIs limited to 32 bits,
            such as ``numpy.random.seed`` or ``PYTHONHASHSEED``).

    Returns:
        An integer in [0, 2**bits - 1]. The same arguments give the same value
        in every process and on every platform.
    """
    check_seed(seed)
    if bits not in (32, 64):
        raise ValueError(f"bits must be 32 or 64, got {bits!r}")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"stream indices must be integers, got {index!r}")
        if not 0 <= int(index) <= MAX_USER_SEED:
            raise ValueError(f"stream indices must be in [0, {MAX_USER_SEED}], got {index}")
    # A uint32 array is hashed exactly like the list of the same words, and faster.
    entropy = np.array([seed, stream_code(stream), len(indices), *indices], dtype=np.uint32)
    words = np.random.SeedSequence(entropy).generate_state(bits // 32, dtype=np.uint32)
    value = 0
    for word in words:
        value = (value << 32) | int(word)
    return value


def mix64(key: int, index: int) -> int:
    """Combine a 64-bit ``key`` with a sample ``index`` into a 64-bit seed (SplitMix64).

    Cheap (about 1 µs in Python) and well mixed: for a fixed key, distinct
    indices below 2**64 always give distinct results.
    """
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix64_array(keys: int | np.ndarray, indices: int | np.ndarray) -> np.ndarray:
    """:func:`mix64` over arrays: ``mix64(keys[i], indices[i])`` for each ``i``, as ``uint64``.

    ``keys`` and ``indices`` broadcast against each other; both must hold
    integers in [0, 2**64 - 1]. Equal to :func:`mix64` element by element (the
    arithmetic wraps modulo 2**64 in both), and fast enough to derive the
    augmentation of a whole batch at once (about 10 ns per element).
    """
    keys, indices = np.asarray(keys), np.asarray(indices)
    for name, values in (("keys", keys), ("indices", indices)):
        if values.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
        if values.dtype.kind == "i" and values.size and values.min() < 0:
            raise ValueError(f"{name} must be non-negative, got {values.min()}")
    with np.errstate(over="ignore"):  # wrapping modulo 2**64 is the point; NumPy warns for 0-d arrays
        z = keys.astype(np.uint64) + (indices.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class SeedPlan:
    """The named streams of one run, derived from one user seed.

    ``model_seed``, ``order_seed`` and ``aug_seed`` replace the user seed for
    one stream alone, so that a study can vary the weight initialisation, the
    data order or the augmentation independently. An override ``X`` gives that
    stream exactly as a run with ``seed=X`` would have it.

    | stream  | indices               | same on every rank? |
    |---------|-----------------------|---------------------|
    | model   | none                  | yes                 |
    | whitening | none                | yes                 |
    | order   | epoch                 | yes                 |
    | aug     | epoch, sample index   | yes                 |
    | runtime | rank                  | no                  |
    | worker  | rank, worker id       | no                  |
    """

    seed: int
    model_seed: int | None = None
    order_seed: int | None = None
    aug_seed: int | None = None

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("model_seed", "order_seed", "aug_seed"):
            value = getattr(self, name)
            if value is not None:
                check_seed(value, name)

    def _base(self, override: int | None) -> int:
        return self.seed if override is None else override

    def model(self) -> int:
        """Seed for weight initialisation; identical on every rank."""
        return derive_seed(self._base(self.model_seed), "model")

    def whitening(self) -> int:
        """Seed of the choice of training images a data-dependent initialisation (such as
        a whitening layer) is computed from; identical on every rank, varied by ``model_seed``."""
        return derive_seed(self._base(self.model_seed), "whitening")

    def order(self, epoch: int) -> int:
        """Seed of the global permutation of the training set in ``epoch``."""
        return derive_seed(self._base(self.order_seed), "order", epoch)

    def aug_epoch_key(self, epoch: int) -> int:
        """Per-epoch key of the augmentation stream; see :meth:`aug`."""
        return derive_seed(self._base(self.aug_seed), "aug", epoch)

    def aug(self, epoch: int, index: int) -> int:
        """Seed of the augmentation of sample ``index`` in ``epoch``."""
        return mix64(self.aug_epoch_key(epoch), index)

    def aug_array(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """:meth:`aug` for many samples of one epoch at once, as ``uint64``."""
        return mix64_array(self.aug_epoch_key(epoch), indices)

    def runtime(self, rank: int) -> int:
        """Seed of the randomness inside the training step (dropout) on ``rank``."""
        return derive_seed(self.seed, "runtime", rank)

    def worker(self, rank: int, worker_id: int) -> int:
        """Seed of DataLoader worker ``worker_id`` on ``rank``."""
        return derive_seed(self.seed, "worker", rank, worker_id)

    def as_dict(self, rank: int = 0) -> dict[str, int | None]:
        """The user seeds and a few derived seeds, for the run's manifest."""
        return {
            "seed": self.seed,
            "model_seed": self.model_seed,
            "order_seed": self.order_seed,
            "aug_seed": self.aug_seed,
            "model": self.model(),
            "order_epoch0": self.order(0),
            "aug_epoch0_key": self.aug_epoch_key(0),
            f"runtime_rank{rank}": self.runtime(rank),
        }
