"""Per-sample augmentation seeding.

A sample's augmentation must depend on (aug seed, epoch, sample index) alone,
never on which worker or process loaded it or on what was loaded before: then
``num_workers`` does not change the result, and a resumed run augments exactly
as the original did.

:class:`SeededAugmentation` reseeds, for each sample, the global generators that
the transform draws from, named by its ``generators`` argument: ``"torch"``
(torch's CPU generator, which torchvision's transforms draw from), ``"random"``
(Python's) and ``"numpy"`` (NumPy's global state). In the main process
(``num_workers=0``) it also saves those generators' states before the transform
and restores them after, so the caller's streams are untouched; in a worker
process nothing is restored, as nothing else draws there.

What each generator costs per sample, measured on a CPU against about 300 µs
for a crop, flip and normalise of a CIFAR image (see BENCHMARKS.md):

- ``"torch"``: under 2 µs to reseed (``torch.default_generator.manual_seed``;
  ``torch.manual_seed`` would also reseed every CUDA device, 75 µs on a CUDA
  build, so it is not used), and about 3 µs to save and restore. With
  ``generators=("torch",)`` the whole overhead of a sample, seed derivation
  included, is about 10 µs in the main process.
- ``"random"`` and ``"numpy"``: 33-38 µs to reseed the two; in the main process
  also 17-28 µs to save and restore ``random``'s state and 150-180 µs to save
  and restore NumPy's.

The default, all three, is safe for any transform. A transform made only of
torchvision's transforms, or of code that draws with ``torch.rand`` and its kin,
draws from torch's CPU generator alone: pass ``generators=("torch",)``, which
removes nearly all of the cost.

A wrong choice must not pass silently: on the first sample each process
augments (the main process and each DataLoader worker), the states of the
generators not named are compared before and after the transform, and a change
raises ``ValueError`` naming the generator to add. The check runs once per
process (a few hundred µs, for NumPy's state) and costs nothing afterwards. It
sees only what that first sample's transform draws, so a transform that draws
from another generator only now and then (behind a random branch) can still
slip past it.

Only those three global generators are reseeded and checked. A generator that
the transform holds itself (``np.random.default_rng(0)``, ``random.Random(0)``,
a ``torch.Generator``) is neither: each DataLoader worker draws from its own
copy, and a resumed run from a fresh one, so the augmentation would change with
``num_workers`` and on resume, and no error says so. Finding every generator
object a callable can reach is not feasible in general, so none is looked for.
A transform must either draw from the global generators or reseed its own per
sample through ``SeededAugmentation(..., reseed=...)``, which is called with a
seed derived from the sample's before each transform.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from repro.report import short
from repro.seeding import library_seeds
from repro.seeds import SeedPlan, mix64

GENERATORS = ("torch", "random", "numpy")
"""The global generators :class:`SeededAugmentation` can reseed, by name."""

_DESCRIPTIONS = {
    "torch": "torch's CPU generator",
    "random": "Python's random",
    "numpy": "NumPy's global generator",
}

# The mix64 word that derives the seed given to ``reseed`` from a sample's: library_seeds takes 0
# (random) and 1 (NumPy), and torch gets the sample's seed itself, so a generator of the transform's
# own, reseeded with it, does not repeat one of theirs.
_RESEED_WORD = 2

# NumPy's global RandomState, which ``np.random.rand`` and its kin draw from.
_numpy_global = np.random.mtrand._rand


def _get_numpy_state() -> dict[str, Any]:
    # The bit generator's state and the cached Gaussian (``randn`` draws two at
    # a time and keeps one), which the bit generator's state alone would miss.
    return _numpy_global.get_state(legacy=False)


def _set_numpy_state(state: dict[str, Any]) -> None:
    _numpy_global.set_state(state)


def _same_numpy_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["state"]["pos"] == b["state"]["pos"]
        and np.array_equal(a["state"]["key"], b["state"]["key"])
        and a["has_gauss"] == b["has_gauss"]
        and a["gauss"] == b["gauss"]
    )


# name: (get the state, set the state, are two states equal)
_STATE = {
    "torch": (torch.default_generator.get_state, torch.default_generator.set_state, torch.equal),
    "random": (random.getstate, random.setstate, lambda a, b: a == b),
    "numpy": (_get_numpy_state, _set_numpy_state, _same_numpy_state),
}


def check_generators(generators: Iterable[str]) -> tuple[str, ...]:
    """Return ``generators`` as a tuple after checking that it names a non-empty
    subset of :data:`GENERATORS`, each once; raise ``ValueError`` otherwise."""
    choices = ", ".join(repr(name) for name in GENERATORS)
    if isinstance(generators, str):
        raise ValueError(f"generators must be a tuple of names such as ('torch',), not the string {generators!r}")
    generators = tuple(generators)
    if not generators:
        raise ValueError(f"generators is empty: name at least one of {choices}")
    for name in generators:
        if name not in GENERATORS:
            raise ValueError(f"unknown generator {name!r} in generators: choose from {choices}")
        if generators.count(name) > 1:
            raise ValueError(f"generator {name!r} appears more than once in generators {generators!r}")
    return generators


def _seed(seed: int, seed_torch: bool, seed_random: bool, seed_numpy: bool) -> None:
    if not (seed_random or seed_numpy):
        # library_seeds gives torch the seed itself; skipping its two mixes saves 2 µs.
        torch.default_generator.manual_seed(seed)
        return
    python_seed, numpy_words, torch_seed = library_seeds(seed)
    if seed_torch:
        torch.default_generator.manual_seed(torch_seed)
    if seed_random:
        random.seed(python_seed)
    if seed_numpy:
        np.random.seed(numpy_words)


def seed_sample_generators(seed: int, generators: Iterable[str] = GENERATORS) -> None:
    """Seed the named global generators (by default torch's CPU generator,
    ``random`` and NumPy's global state) from a 64-bit per-sample ``seed``.

    Each library gets its own seed from :func:`repro.seeding.library_seeds`.
    Reseeding torch costs under 2 µs, ``random`` and NumPy together 33-38 µs.
    """
    names = check_generators(generators)
    _seed(seed, "torch" in names, "random" in names, "numpy" in names)


class SeededAugmentation(Dataset):
    """Apply ``transform`` to ``dataset[index]`` with randomness from (aug seed, epoch, index).

    Index it with ``(epoch, index)`` keys, as :class:`repro.loader.GlobalBatchSampler`
    yields them. ``dataset[index]`` must return ``(input, target)``; the
    transform is applied to the input.

    Before each sample's transform the generators named in ``generators`` are
    reseeded from the sample's seed; in the main process (``num_workers=0``)
    their states are saved before and restored after, so the caller's streams
    are untouched. The default, all three, suits any transform but costs, per
    sample, 33-38 µs to reseed ``random`` and NumPy and, in the main process,
    170-210 µs more to save and restore their states, against about 300 µs for
    a crop, flip and normalise. torchvision's transforms draw from torch's CPU
    generator only: for a transform made of them (or of ``torch.rand`` and its
    kin) pass ``generators=("torch",)``, which costs a few µs a sample.

    On the first sample each process augments (the main process and each
    DataLoader worker, told apart by ``os.getpid()``), the states of the
    generators not named are compared before and after the transform: if the
    transform drew from one, ``ValueError`` names the generator to add (in the
    main process, that generator's state is first put back). Only that first
    sample is checked, so a transform that draws from another generator only on
    some samples may not be caught.

    Covered are the three global generators: Python's ``random``, NumPy's
    legacy global state (``np.random.rand`` and its kin) and torch's default CPU
    generator. A generator object the transform holds itself
    (``np.random.default_rng(0)``, ``random.Random(0)``, a ``torch.Generator``)
    is not reseeded, and cannot be detected (nothing lists the generators a
    callable reaches): with it, ``num_workers`` and a resume change the
    augmentation, silently. Hold none, or pass ``reseed``, which gets a 64-bit
    seed derived from the sample's before each transform, in the main process and
    in every worker::

        class Brightness:
            def __init__(self):
                self.rng = np.random.default_rng()

            def __call__(self, image):
                return image * self.rng.uniform(0.8, 1.2)

            def reseed(self, seed: int) -> None:
                self.rng = np.random.default_rng(seed)

        brightness = Brightness()
        SeededAugmentation(data, brightness, plan, generators=("torch",), reseed=brightness.reseed)

    Args:
        dataset: the un-augmented dataset.
        transform: the random augmentation, a callable on one input.
        seeds: the run's :class:`repro.seeds.SeedPlan` (its aug stream is used), or a
            plain user seed, which behaves exactly as ``SeedPlan(seed)``; anything
            else (``"2333"``) raises ``ValueError`` here.
        generators: the global generators ``transform`` draws from, a non-empty
            subset of ``("torch", "random", "numpy")``; only these are reseeded
            (and, in the main process, saved and restored) for each sample.
        reseed: called with each sample's derived seed (``mix64(seed, 2)`` of
            :meth:`sample_seed`'s) before its transform, to reseed the generators
            the transform holds itself; ``None`` (default) when it holds none.
            Like the transform, it is pickled into workers that are spawned.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Any],
        seeds: SeedPlan | int,
        *,
        generators: tuple[str, ...] = GENERATORS,
        reseed: Callable[[int], None] | None = None,
    ) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be a callable, got {short(transform)}")
        if reseed is not None and not callable(reseed):
            raise TypeError(f"reseed must be a callable or None, got {short(reseed)}")
        self.dataset = dataset
        self.transform = transform
        self.seeds = SeedPlan.of(seeds)
        self.generators = check_generators(generators)
        self.reseed = reseed
        self._seed_torch = "torch" in self.generators
        self._seed_random = "random" in self.generators
        self._seed_numpy = "numpy" in self.generators
        # The generators not named: checked on the first sample of each process.
        self._unseeded = tuple(name for name in GENERATORS if name not in self.generators)
        self._checked_pid: int | None = None
        self._epoch_keys: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, epoch: int, index: int) -> int:
        """Return the 64-bit seed of sample ``index``'s augmentation in ``epoch``."""
        key = self._epoch_keys.get(epoch)
        if key is None:
            key = self._epoch_keys[epoch] = self.seeds.aug_epoch_key(epoch)
        return mix64(key, index)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        try:
            epoch, index = key
        except (TypeError, ValueError):  # a plain index: a DataLoader with an ordinary sampler
            raise TypeError(
                f"SeededAugmentation got the key {short(key)}, not (epoch, index): index it with "
                "GlobalBatchSampler's (epoch, index) keys, DataLoader(..., batch_sampler=GlobalBatchSampler(...))"
            ) from None
        sample, target = self.dataset[index]
        seed = self.sample_seed(epoch, index)
        if get_worker_info() is not None:
            self._seed_all(seed)
            return self._apply(sample), target
        saved = [(name, _STATE[name][0]()) for name in self.generators]
        try:
            self._seed_all(seed)
            return self._apply(sample), target
        finally:
            for name, state in saved:
                _STATE[name][1](state)

    def _seed_all(self, seed: int) -> None:
        """Reseed the named global generators and, through ``reseed``, the transform's own."""
        _seed(seed, self._seed_torch, self._seed_random, self._seed_numpy)
        if self.reseed is not None:
            self.reseed(mix64(seed, _RESEED_WORD))

    def _apply(self, sample: Any) -> Any:
        if not self._unseeded or self._checked_pid == os.getpid():
            return self.transform(sample)
        before = {name: _STATE[name][0]() for name in self._unseeded}
        output = self.transform(sample)
        drawn = [name for name in self._unseeded if not _STATE[name][2](before[name], _STATE[name][0]())]
        if drawn:
            for name in drawn:
                _STATE[name][1](before[name])
            sources = " and ".join(_DESCRIPTIONS[name] for name in drawn)
            names = " and ".join(repr(name) for name in drawn)
            raise ValueError(
                f"the transform drew from {sources}, which SeededAugmentation(generators={self.generators!r}) "
                f"does not reseed: add {names} to generators"
            )
        self._checked_pid = os.getpid()
        return output
