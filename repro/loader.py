"""DataLoader support: worker seeding, seeded generators, and a resumable,
rank-sharded batch sampler.

Three traps this module avoids:

- Workers forked from one process share its ``random`` and NumPy state, and
  workers of different ranks get the same streams unless the rank is mixed in.
  :class:`WorkerSeeder` seeds each worker from ``worker(rank, worker_id)``.
- A DataLoader without a ``generator`` draws its workers' base seed from the
  global torch generator every time an iterator is created, so creating an
  evaluation loader shifts the training stream. :func:`make_generator` gives
  each loader its own.
- A sampler whose epoch and position are not saved makes a resumed run replay
  epoch 0 or skip batches. :class:`GlobalBatchSampler` yields ``(epoch,
  index)`` keys from a permutation that depends only on (order seed, epoch),
  starts at any batch, and reports its position.

Each takes the run's :class:`repro.seeds.SeedPlan`, or a plain int seed, which
behaves exactly as ``SeedPlan(seed)``; :meth:`repro.seeds.SeedPlan.generator`
is the plan's :func:`make_generator`.

With accelerate, do not pass a DataLoader built on :class:`GlobalBatchSampler`
to ``accelerator.prepare``: the sampler already yields this rank's share of
each global batch, and accelerate's ``BatchSamplerShard`` would shard it a
second time and, with 2 or more processes, yield no batch at all (measured:
0 samples per rank, no error, accelerate 1.15); with ``dispatch_batches=True``
(accelerate's default for an ``IterableDataset``) its ``DataLoaderDispatcher``
would instead split rank 0's share among the processes, and the other ranks'
samples would never be trained on (measured: 20 of 40 samples an epoch with 2
processes). Build the sampler with
``rank=accelerator.process_index, world_size=accelerator.num_processes``,
prepare only the model and optimizer, and move each batch to
``accelerator.device`` yourself. A sampler that accelerate shards or dispatches
raises ``RuntimeError`` saying so when its first batch is drawn.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import numpy as np
import torch

from repro.seeding import seed_generators
from repro.seeds import SeedPlan, derive_seed

# The libraries whose frames lie between a DataLoader's consumer and the sampler it draws from.
_LOADER_LIBRARIES = frozenset({"torch", "torchdata", "accelerate"})
_PREPARE_ADVICE = (
    "do not pass its DataLoader to accelerator.prepare; build GlobalBatchSampler(..., "
    "rank=accelerator.process_index, world_size=accelerator.num_processes) and move each batch to "
    "accelerator.device yourself"
)

SampleKey = tuple[int, int]
"""``(epoch, sample index)``: what a sample's augmentation depends on."""


class WorkerSeeder:
    """A picklable ``worker_init_fn`` that seeds ``random``, NumPy and torch in
    each DataLoader worker from ``plan.worker(rank, worker_id)``.

    What it sets: the global generators of the worker process it runs in. When:
    pass it as ``worker_init_fn=`` to every DataLoader with workers. Why:
    workers forked from one process share its ``random`` and NumPy state, and
    workers of different ranks would share streams unless the rank is mixed in.
    Worker streams differ across workers and ranks and repeat across runs. They
    drive only what user code draws in a worker outside
    :class:`repro.augment.SeededAugmentation`; the augmentation of a sample does
    not depend on which worker loads it.

    Args:
        plan: the run's :class:`repro.seeds.SeedPlan`, or a plain user seed.
        rank: this process's global rank.
    """

    def __init__(self, plan: SeedPlan | int, rank: int = 0) -> None:
        self.plan = SeedPlan.of(plan)
        rank = _integer("rank", rank)  # checked here: in the worker, it would fail far from the mistake
        if rank < 0:
            raise ValueError(f"rank must be non-negative, got {rank}")
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        seed_generators(self.plan.worker(self.rank, worker_id))


def make_generator(seed: int, stream: str, *indices: int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded from ``derive_seed(seed, stream, *indices)``.

    The plain-int helper: ``make_generator(seed, name, rank)`` equals
    ``SeedPlan(seed).generator(name, rank)``, which is what a run holding a plan
    should call. Give one to every DataLoader (``generator=``), training and
    evaluation, so that creating a loader's iterator never draws from the
    global generator.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, stream, *indices))
    return generator


def _integer(name: str, value: object) -> int:
    """``value`` as an int (NumPy's integers and one-element integer tensors too), or a
    ``ValueError`` naming ``name``. A bool is refused: ``True`` is never meant as 1 here."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _flag(name: str, value: object) -> bool:
    """``value`` as a bool (NumPy's too), or a ``ValueError`` naming ``name``: a string such as
    ``"False"`` is true, so taking its truth would do the opposite of what it says."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


class GlobalBatchSampler:
    """Yield this rank's share of each global batch of a seeded permutation.

    Epoch ``e``'s order is ``torch.randperm(num_samples)`` drawn from a generator
    seeded with ``plan.order(e)`` (the order stream of the plan, or of
    ``SeedPlan(seed)`` for a plain int), identical on every rank.
    Global batch ``t`` is ``order[t*B:(t+1)*B]`` for the global batch size ``B``;
    rank ``r`` of ``W`` takes the ``r``-th of its ``W`` equal slices. So the set of
    samples in global step ``t`` is the same for any world size, and a position
    counted in global batches stays valid when the world size changes.

    Padding rule: with ``drop_last=True`` (the default for training) a final
    incomplete global batch is dropped. With ``drop_last=False`` it is completed
    with the first samples of the same epoch's order (the order repeated, when a
    batch is larger than the dataset), so every rank gets a full slice and every
    sample appears at least once.

    Each element yielded is a list of ``(epoch, index)`` keys. The keys carry
    the epoch to the dataset, so persistent workers, which keep their own copy
    of the dataset, still see the right epoch.

    It shards by itself: do not let accelerate shard it again. Leave its
    DataLoader out of ``accelerator.prepare`` (see the module's docstring);
    iterating it under accelerate's ``BatchSamplerShard`` or ``DataLoaderDispatcher``
    raises ``RuntimeError``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: SeedPlan | int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        num_samples, batch_size = _integer("num_samples", num_samples), _integer("batch_size", batch_size)
        rank, world_size = _integer("rank", rank), _integer("world_size", world_size)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"global batch size {batch_size} must be a positive multiple of the world size {world_size}"
            )
        shuffle, drop_last = _flag("shuffle", shuffle), _flag("drop_last", drop_last)
        if drop_last and num_samples < batch_size:
            raise ValueError(f"global batch size {batch_size} exceeds the {num_samples} samples with drop_last")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.plan = SeedPlan.of(seed)
        self.seed = self.plan.order_base  # what the state_dict records: the order stream's seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        """Number of global batches in a whole epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch, and the global batch to start from, of the next iteration.

        Call it before iterating each epoch (forgetting it repeats epoch 0's
        order); pass ``start_batch`` to resume in the middle of an epoch.
        """
        epoch, start_batch = _integer("epoch", epoch), _integer("start_batch", start_batch)
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Return the global order of sample indices in ``epoch``, padded as documented."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.plan.order(epoch))
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.drop_last:
            return order[: len(self) * self.batch_size]
        # The order repeated as often as it takes: a batch larger than the dataset needs it more than once.
        return order.repeat(-(-len(self) * self.batch_size // self.num_samples))[: len(self) * self.batch_size]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        _refuse_second_sharding(sys._getframe(1))
        for indices in self.index_batches():
            yield [(self.epoch, index) for index in indices.tolist()]

    def index_batches(self) -> Iterator[np.ndarray]:
        """The same batches as iterating the sampler, as int64 arrays of sample indices.

        For a consumer that handles a batch as an array (the device pipeline):
        it skips the tuple per sample and the list of the whole epoch's order,
        which at batch 1024 cost about 0.25 ms of host time a step on a 2-core
        machine (bench/host_overhead.py; 0.04 ms this way). The arrays are
        views of the epoch's order: read them, do not write to them.
        """
        order = self.epoch_order(self.epoch).numpy()
        local = self.batch_size // self.world_size
        for batch in range(self.start_batch, len(self)):
            begin = batch * self.batch_size + self.rank * local
            yield order[begin : begin + local]

    def state_dict(self, batches_consumed: int) -> dict[str, Any]:
        """Return the position to resume from, as plain integers.

        A DataLoader fetches batches ahead of the training loop, so only the
        loop knows how many it has consumed since this iteration began: pass
        that count. It must be an integer (a NumPy integer or a one-element
        integer tensor is converted), so that the state reads back as one: a
        float such as ``seen / batch_size`` raises ``ValueError``, as does a
        count that puts the position outside the epoch's batches.
        """
        consumed = _integer("batches_consumed", batches_consumed)
        position = self.start_batch + consumed
        if not 0 <= position <= len(self):
            raise ValueError(
                f"batches_consumed {consumed} puts the sampler at batch {position}, outside the epoch's "
                f"{len(self)} batches (this iteration began at batch {self.start_batch})"
            )
        return {
            "version": 1,
            "epoch": self.epoch,
            "position": position,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the epoch and position of ``state``.

        Raises ``ValueError`` if ``state`` was written for another dataset size,
        global batch size or seed, where its position would mean other samples.
        """
        if state.get("version") != 1:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        for key in ("num_samples", "batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}")
        self.set_epoch(int(state["epoch"]), int(state["position"]))


def _refuse_second_sharding(caller: FrameType | None) -> None:
    """Raise ``RuntimeError`` if accelerate is drawing the first batch, as found in the frames
    from ``caller`` (the frame drawing it) up to the first that is not torch's or accelerate's.

    Its ``BatchSamplerShard`` would shard the already sharded batches again: with 2 or more
    processes it yields none (it waits for batches of the global size). Its
    ``DataLoaderDispatcher`` (``dispatch_batches=True``, accelerate's default for an
    ``IterableDataset``) draws on rank 0 alone and splits rank 0's share among the processes:
    the other ranks' samples are never trained on (half of each epoch with 2 processes). It is
    refused with one process too, where it changes nothing, so that the script fails before
    it runs on more.
    """
    accelerate_loader = sys.modules.get("accelerate.data_loader")
    if accelerate_loader is None:
        return
    frame = caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LOADER_LIBRARIES:
        drawer = frame.f_locals.get("self")
        if isinstance(drawer, accelerate_loader.BatchSamplerShard):
            raise RuntimeError(
                "accelerate is sharding a GlobalBatchSampler that already yields this rank's share of each "
                f"global batch (it would train on nothing with {drawer.num_processes} processes): {_PREPARE_ADVICE}"
            )
        if isinstance(drawer, accelerate_loader.DataLoaderDispatcher):
            raise RuntimeError(
                "accelerate's DataLoaderDispatcher (dispatch_batches) is drawing a GlobalBatchSampler's batches on "
                "rank 0 and splitting them among the processes, so the other ranks' samples would never be "
                f"trained on: {_PREPARE_ADVICE}"
            )
        frame = frame.f_back
