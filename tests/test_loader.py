"""The sharded, resumable sampler and the worker seeding (repro.loader)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from repro.augment import SeededAugmentation
from repro.loader import GlobalBatchSampler, WorkerSeeder, make_generator
from repro.seeds import SeedPlan


def shards(num_samples, batch_size, world_size, epoch=0, drop_last=False):
    result = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(
            num_samples, batch_size, 2333, rank=rank, world_size=world_size, drop_last=drop_last
        )
        sampler.set_epoch(epoch)
        result.append([index for batch in sampler for _, index in batch])
    return result


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_epoch(world_size):
    num_samples, batch_size = 1001, 12
    per_rank = shards(num_samples, batch_size, world_size)
    everything = [i for shard in per_rank for i in shard]
    assert set(everything) == set(range(num_samples))
    padding = len(everything) - num_samples
    assert padding == (-num_samples) % batch_size  # only the documented padding repeats
    sampler = GlobalBatchSampler(num_samples, batch_size, 2333, drop_last=False)
    order = sampler.epoch_order(0).tolist()
    assert order[num_samples:] == order[:padding]  # padded from the start of the epoch's order


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_batch_larger_than_the_dataset_is_padded_to_a_full_slice_on_every_rank(world_size):
    # 3 samples, a global batch of 8: the order repeats until the batch is full.
    per_rank = shards(3, 8, world_size)
    assert [len(shard) for shard in per_rank] == [8 // world_size] * world_size
    assert {i for shard in per_rank for i in shard} == {0, 1, 2}


def test_bad_sampler_arguments_raise_value_errors():
    for arguments, message in (((100, 32.0, 0), "batch_size must be an integer, got 32.0"),
                               ((True, 32, 0), "num_samples must be an integer, got True")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GlobalBatchSampler(*arguments)
    with pytest.raises(ValueError, match="rank must be an integer, got '0'"):
        GlobalBatchSampler(100, 32, 0, rank="0")
    with pytest.raises(ValueError, match=r"epoch must be an integer, got 1\.5"):
        GlobalBatchSampler(100, 32, 0).set_epoch(1.5)
    assert len(GlobalBatchSampler(np.int64(100), 32, 0)) == 3  # NumPy's integers are integers


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"shuffle": "no"}, "shuffle must be True or False, got 'no'"),
        ({"drop_last": "False"}, "drop_last must be True or False, got 'False'"),  # a true string
        ({"shuffle": 0}, "shuffle must be True or False, got 0"),
    ],
    ids=repr,
)
def test_sampler_flags_that_are_not_bools_are_refused(arguments, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        GlobalBatchSampler(100, 32, 0, **arguments)
    assert GlobalBatchSampler(100, 32, 0, shuffle=np.False_).shuffle is False


def test_a_worker_seeder_rank_that_is_not_an_integer_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"^rank must be an integer, got 1\.5$"):
        WorkerSeeder(1, 1.5)
    assert WorkerSeeder(1, np.int64(1)).rank == 1


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_global_step_holds_the_same_samples_for_any_world_size(world_size):
    def steps(w):
        samplers = [GlobalBatchSampler(240, 12, 2333, rank=r, world_size=w) for r in range(w)]
        for s in samplers:
            s.set_epoch(3)
        return [sorted(key for batch in batches for key in batch) for batches in zip(*samplers, strict=True)]

    assert steps(world_size) == steps(1)


def test_epochs_differ_and_repeat():
    sampler = GlobalBatchSampler(100, 10, 2333)
    assert sampler.epoch_order(0).tolist() != sampler.epoch_order(1).tolist()
    assert sampler.epoch_order(1).tolist() == GlobalBatchSampler(100, 10, 2333).epoch_order(1).tolist()


def test_resume_at_position_k_yields_exactly_the_rest_of_the_epoch():
    sampler = GlobalBatchSampler(100, 10, 2333, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    for k in range(len(full) + 1):
        state = sampler.state_dict(batches_consumed=k)
        resumed = GlobalBatchSampler(100, 10, 2333, rank=1, world_size=2)
        resumed.load_state_dict(state)
        assert list(resumed) == full[k:]


@pytest.mark.parametrize("drop_last", [True, False])
def test_index_batches_are_the_samplers_batches_as_arrays(drop_last):
    sampler = GlobalBatchSampler(101, 12, 2333, rank=1, world_size=3, drop_last=drop_last)
    sampler.set_epoch(2, start_batch=3)
    order, local = sampler.epoch_order(2).tolist(), 12 // 3
    expected = [order[batch * 12 + local : batch * 12 + 2 * local] for batch in range(3, len(sampler))]
    arrays = list(sampler.index_batches())
    assert all(array.dtype == np.int64 for array in arrays)
    assert [array.tolist() for array in arrays] == expected
    assert list(sampler) == [[(2, index) for index in batch] for batch in expected]


def test_state_from_another_dataset_or_seed_is_refused():
    state = GlobalBatchSampler(100, 10, 2333).state_dict(0)
    with pytest.raises(ValueError, match="num_samples"):
        GlobalBatchSampler(101, 10, 2333).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        GlobalBatchSampler(100, 10, 1).load_state_dict(state)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of the world size"):
        GlobalBatchSampler(100, 10, 1, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(100, 10, 1, rank=2, world_size=2)


def test_a_loader_prepared_with_dispatch_batches_raises_instead_of_training_on_rank_0s_share():
    # dispatch_batches=True (accelerate's default for an IterableDataset) wraps the loader in a
    # DataLoaderDispatcher, which draws on rank 0 and splits that share among the ranks. Its frames
    # draw the first batch as they do with 2 processes; refused with one too, before a run on more.
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=True))
    plan = SeedPlan(1)
    dataset = SeededAugmentation(TensorDataset(torch.arange(16.0)), lambda x: x, plan, generators=("torch",))
    loader = accelerator.prepare(DataLoader(dataset, batch_sampler=GlobalBatchSampler(16, 4, plan)))
    with pytest.raises(RuntimeError, match=r"DataLoaderDispatcher \(dispatch_batches\) is drawing a GlobalBatchSam"):
        next(iter(loader))


class Draws(Dataset):
    """Returns what a worker's global generators produce."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor([random.random(), np.random.rand(), torch.rand(1).item()], dtype=torch.float64)


def worker_draws(rank: int) -> list[list[float]]:
    loader = DataLoader(
        Draws(), batch_size=1, num_workers=2, worker_init_fn=WorkerSeeder(2333, rank), generator=make_generator(1, "t")
    )
    return [batch[0].tolist() for batch in loader]


def test_worker_streams_differ_across_workers_and_ranks_and_repeat_across_runs():
    rank0 = worker_draws(0)
    assert rank0 == worker_draws(0)
    assert rank0[0] != rank0[1]  # items 0 and 1 go to workers 0 and 1
    assert rank0[0][0] != rank0[0][1]  # random and numpy draw different numbers
    rank1 = worker_draws(1)
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))


def test_make_generator_is_seeded_and_independent_of_the_global_generator():
    a = torch.rand(3, generator=make_generator(2333, "test_loader", 0))
    torch.manual_seed(99)
    assert torch.equal(a, torch.rand(3, generator=make_generator(2333, "test_loader", 0)))
