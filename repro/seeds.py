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

Every stream a run draws from, in one table. :class:`SeedPlan` derives each;
the code names a stream by its constant ``<NAME>_STREAM`` (``ORDER_STREAM``,
``TRAIN_LOADER_STREAM``, ...), never by a literal, and :data:`STREAMS` lists them.

| stream           | indices            | same on every rank? | drives                                          |
|------------------|--------------------|---------------------|-------------------------------------------------|
| ``model``        | none               | yes                 | weight initialisation                           |
| ``whitening``    | none               | yes                 | the images a data-dependent init is computed on |
| ``order``        | epoch              | yes                 | the global permutation of the training set      |
| ``aug``          | epoch (then mix64) | yes                 | each sample's augmentation                      |
| ``runtime``      | rank               | no                  | the global generators (dropout) of the step     |
| ``worker``       | rank, worker id    | no                  | the global generators of a DataLoader worker    |
| ``train_loader`` | rank               | no                  | the training DataLoader's ``generator``         |
| ``test_loader``  | rank               | no                  | the evaluation DataLoader's ``generator``       |

The two loader streams are the names train.py gives its DataLoaders' generators;
:meth:`SeedPlan.generator` takes any name.

``model_seed``, ``order_seed`` and ``aug_seed`` of :class:`SeedPlan` replace
the user seed for the model and whitening, order and aug streams; every other
stream derives from the user seed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from repro.report import short

if TYPE_CHECKING:
    import torch

MAX_USER_SEED = 2**32 - 1
_MASK64 = 2**64 - 1

MODEL_STREAM = "model"
WHITENING_STREAM = "whitening"
ORDER_STREAM = "order"
AUG_STREAM = "aug"
RUNTIME_STREAM = "runtime"
WORKER_STREAM = "worker"
TRAIN_LOADER_STREAM = "train_loader"
TEST_LOADER_STREAM = "test_loader"
STREAMS = (
    MODEL_STREAM,
    WHITENING_STREAM,
    ORDER_STREAM,
    AUG_STREAM,
    RUNTIME_STREAM,
    WORKER_STREAM,
    TRAIN_LOADER_STREAM,
    TEST_LOADER_STREAM,
)
"""Every stream the project derives, as in the module's table."""


def check_seed(seed: object, name: str = "seed") -> int:
    """Return ``seed`` if it is an integer in [0, 2**32 - 1], else raise ``ValueError``.

    The one check of a user seed's range: the library's entry points and the
    pipeline's config both call it. ``bool`` is rejected although it is an
    ``int`` subclass: ``seed=True`` is always a mistake. The message is one line
    and echoes at most about 40 digits of the refused value.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [0, {MAX_USER_SEED}], got {short(seed)}")
    if not 0 <= int(seed) <= MAX_USER_SEED:
        raise ValueError(f"{name} must be in [0, {MAX_USER_SEED}], got {short(int(seed))}")
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

    The one object that carries the seed: give it to every component
    (:func:`repro.seeding.seed_everything`, :class:`repro.loader.GlobalBatchSampler`,
    :class:`repro.loader.WorkerSeeder`, :meth:`generator` for each DataLoader,
    :class:`repro.augment.SeededAugmentation`) and write :meth:`as_dict` into the
    run's record, so that what is recorded is what was used. The streams are
    listed in this module's table.

    ``model_seed``, ``order_seed`` and ``aug_seed`` replace the user seed for
    one stream alone (``model_seed`` also for ``whitening``), so that a study
    can vary the weight initialisation, the data order or the augmentation
    independently. An override ``X`` gives that stream exactly as a run with
    ``seed=X`` would have it.
    """

    seed: int
    model_seed: int | None = None
    order_seed: int | None = None
    aug_seed: int | None = None
    # The seeds of the loader generators made by generator(), for as_dict: a record, not part of the plan.
    _loader_seeds: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("model_seed", "order_seed", "aug_seed"):
            value = getattr(self, name)
            if value is not None:
                check_seed(value, name)

    @classmethod
    def of(cls, seed: SeedPlan | int) -> SeedPlan:
        """Return ``seed`` itself if it is a plan, else the plan of the plain user seed ``seed``.

        For the components that accept either: a plain int ``n`` behaves
        exactly as ``SeedPlan(n)``. Raises ``ValueError`` for anything else.
        """
        return seed if isinstance(seed, SeedPlan) else cls(check_seed(seed))

    def _base(self, override: int | None) -> int:
        return self.seed if override is None else override

    @property
    def order_base(self) -> int:
        """The seed the order stream derives from: ``order_seed`` if set, else ``seed``."""
        return self._base(self.order_seed)

    def model(self) -> int:
        """Seed for weight initialisation; identical on every rank."""
        return derive_seed(self._base(self.model_seed), MODEL_STREAM)

    def whitening(self) -> int:
        """Seed of the choice of training images a data-dependent initialisation (such as
        a whitening layer) is computed from; identical on every rank, varied by ``model_seed``."""
        return derive_seed(self._base(self.model_seed), WHITENING_STREAM)

    def order(self, epoch: int) -> int:
        """Seed of the global permutation of the training set in ``epoch``."""
        return derive_seed(self.order_base, ORDER_STREAM, epoch)

    def aug_epoch_key(self, epoch: int) -> int:
        """Per-epoch key of the augmentation stream; see :meth:`aug`."""
        return derive_seed(self._base(self.aug_seed), AUG_STREAM, epoch)

    def aug(self, epoch: int, index: int) -> int:
        """Seed of the augmentation of sample ``index`` in ``epoch``."""
        return mix64(self.aug_epoch_key(epoch), index)

    def aug_array(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """:meth:`aug` for many samples of one epoch at once, as ``uint64``."""
        return mix64_array(self.aug_epoch_key(epoch), indices)

    def runtime(self, rank: int) -> int:
        """Seed of the randomness inside the training step (dropout) on ``rank``."""
        return derive_seed(self.seed, RUNTIME_STREAM, rank)

    def worker(self, rank: int, worker_id: int) -> int:
        """Seed of DataLoader worker ``worker_id`` on ``rank``."""
        return derive_seed(self.seed, WORKER_STREAM, rank, worker_id)

    def loader(self, name: str, rank: int = 0) -> int:
        """Seed of the generator of the DataLoader ``name`` (such as ``"train_loader"``) on ``rank``."""
        return derive_seed(self.seed, name, rank)

    def generator(self, name: str, rank: int = 0) -> torch.Generator:
        """Return a CPU ``torch.Generator`` seeded with :meth:`loader` ``(name, rank)``.

        What it sets: nothing global; the generator is new. When: for each
        DataLoader, as its ``generator=``, training and evaluation alike. Why: a
        DataLoader without one draws its workers' base seed from the global torch
        generator each time an iterator is created, so creating an evaluation
        loader would shift the training stream. Name each loader differently;
        the project's names are ``TRAIN_LOADER_STREAM`` and ``TEST_LOADER_STREAM``.
        """
        import torch  # here, not at the top: deriving seeds needs NumPy only, and config parsing imports this module

        seed = self.loader(name, rank)
        self._loader_seeds[f"{name}_rank{rank}"] = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        return generator

    def as_dict(self, rank: int = 0) -> dict[str, int | None]:
        """The user seeds and the derived seeds a run on ``rank`` starts from, for its manifest.

        Each value comes from the method the components call: ``runtime_rank{rank}``
        is what :func:`repro.seeding.seed_everything` sets, ``order_epoch0`` what
        the sampler permutes epoch 0 with, and ``{name}_rank{r}`` the seed of
        each generator this plan has made with :meth:`generator` (so call it
        after building the loaders: it lists exactly those they use).
        """
        return {
            "seed": self.seed,
            "model_seed": self.model_seed,
            "order_seed": self.order_seed,
            "aug_seed": self.aug_seed,
            "model": self.model(),
            "whitening": self.whitening(),
            "order_epoch0": self.order(0),
            "aug_epoch0_key": self.aug_epoch_key(0),
            f"runtime_rank{rank}": self.runtime(rank),
            **self._loader_seeds,
        }
