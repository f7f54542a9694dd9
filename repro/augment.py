"""Per-sample augmentation seeding.

A sample's augmentation must depend on (aug seed, epoch, sample index) alone,
never on which worker or process loaded it or on what was loaded before: then
``num_workers`` does not change the result, and a resumed run augments exactly
as the original did.

:class:`SeededAugmentation` reseeds, for each sample, the three generators that
transforms draw from: torch's CPU generator (torchvision), Python's ``random``
and NumPy's global state. Reseeding them costs about 10 µs; ``torch.manual_seed``
would cost 75 µs on a CUDA build, so it is not used. In the main process
(``num_workers=0``) the three states are saved before and restored after, so the
caller's streams are untouched; NumPy's save and restore costs about 90 µs, so
pass ``isolate_numpy=False`` if nothing in the main process draws from NumPy's
global state. In a worker process nothing is restored: nothing else draws there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from repro.seeding import library_seeds
from repro.seeds import SeedPlan, mix64

_numpy_bit_generator = np.random.mtrand._rand._bit_generator


def seed_sample_generators(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and NumPy's global state from a
    64-bit per-sample ``seed``. Cheap (about 10 µs)."""
    python_seed, numpy_words, torch_seed = library_seeds(seed)
    torch.default_generator.manual_seed(torch_seed)
    random.seed(python_seed)
    np.random.seed(numpy_words)


class SeededAugmentation(Dataset):
    """Apply ``transform`` to ``dataset[index]`` with randomness from (aug seed, epoch, index).

    Index it with ``(epoch, index)`` keys, as :class:`repro.loader.GlobalBatchSampler`
    yields them. ``dataset[index]`` must return ``(input, target)``; the
    transform is applied to the input. Any transform may be used: torchvision's
    (which draw from torch's CPU generator), or code that draws from ``random``
    or NumPy's global state.

    Args:
        dataset: the un-augmented dataset.
        transform: the random augmentation, a callable on one input.
        seeds: the run's :class:`repro.seeds.SeedPlan` (its aug stream is used).
        isolate_numpy: save and restore NumPy's global state around each sample
            in the main process (see the module's notes on cost).
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Any],
        seeds: SeedPlan,
        *,
        isolate_numpy: bool = True,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seeds = seeds
        self.isolate_numpy = isolate_numpy
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
        epoch, index = key
        sample, target = self.dataset[index]
        seed = self.sample_seed(epoch, index)
        if get_worker_info() is not None:
            seed_sample_generators(seed)
            return self.transform(sample), target
        torch_state = torch.default_generator.get_state()
        random_state = random.getstate()
        numpy_state = _numpy_bit_generator.state if self.isolate_numpy else None
        try:
            seed_sample_generators(seed)
            return self.transform(sample), target
        finally:
            torch.default_generator.set_state(torch_state)
            random.setstate(random_state)
            if numpy_state is not None:
                _numpy_bit_generator.state = numpy_state
