"""Seeding the global generators of a process.

Libraries draw from global generators that a seed does not reach unless
each is seeded: Python's ``random``, NumPy's legacy global state, torch's CPU
generator and one generator per CUDA device.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from repro.distributed import get_rank
from repro.seeds import MAX_USER_SEED, SeedPlan, mix64

_MAX_DERIVED_SEED = 2**64 - 1


def seed_generators(value: int) -> None:
    """Seed ``random``, NumPy's global state, torch's CPU generator and every CUDA
    device's generator from one 64-bit ``value`` (a derived seed).

    Python's ``random`` and NumPy's legacy state are both MT19937 seeded the
    same way from the same words, so given one value they would draw identical
    numbers: each library gets its own mix of ``value`` (see :func:`library_seeds`).
    Call it wherever a fresh, known state is needed: at start-up (through
    :func:`seed_everything`) and in each DataLoader worker.
    """
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_DERIVED_SEED
    if not valid:
        raise ValueError(f"derived seed must be an integer in [0, {_MAX_DERIVED_SEED}], got {value!r}")
    python_seed, numpy_words, torch_seed = library_seeds(value)
    random.seed(python_seed)
    np.random.seed(numpy_words)
    # torch.manual_seed also queues the seeding of every CUDA device, lazily,
    # so it is safe to call before CUDA is initialised.
    torch.manual_seed(torch_seed)


def library_seeds(value: int) -> tuple[int, list[int], int]:
    """Split one 64-bit seed into distinct seeds for ``random``, NumPy (as two
    32-bit words, keeping all 64 bits) and torch."""
    numpy_seed = mix64(value, 1)
    return mix64(value, 0), [numpy_seed & MAX_USER_SEED, numpy_seed >> 32], value


def seed_everything(plan: SeedPlan | int, rank: int | None = None) -> dict[str, int]:
    """Seed every global generator of this process from the run's seed plan.

    What it sets: ``random``, NumPy's global state, torch's CPU generator and
    each CUDA device's, all from the runtime stream ``plan.runtime(rank)``, so
    that ranks draw different dropout masks while seed 2333 at rank 1 never
    equals seed 2334 at rank 0.

    When: once, at start-up, before the model or any random tensor is created;
    a model built afterwards should take its weights from the ``model`` stream
    (``plan.model()``), identical on every rank.

    Args:
        plan: the run's :class:`repro.seeds.SeedPlan`, or a plain user seed (an
            integer in [0, 2**32 - 1]), which seeds exactly as ``SeedPlan(seed)``
            would; anything else raises ``ValueError`` that states the valid range.
        rank: the global rank; detected with :func:`repro.distributed.get_rank`
            when ``None``.

    Returns:
        ``{"seed": user seed, "rank": rank, "runtime_seed": value}``: what was set.
    """
    plan = SeedPlan.of(plan)
    rank = get_rank() if rank is None else rank
    runtime_seed = plan.runtime(rank)
    seed_generators(runtime_seed)
    return {"seed": plan.seed, "rank": rank, "runtime_seed": runtime_seed}
