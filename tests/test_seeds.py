"""Seed derivation and seeding (repro.seeds, repro.seeding)."""

from __future__ import annotations

import ast
import random

import numpy as np
import pytest
import torch
from conftest import REPO, read_manifest

import repro.seeds
from repro.loader import GlobalBatchSampler, WorkerSeeder, make_generator
from repro.seeding import seed_everything, seed_generators
from repro.seeds import STREAMS, SeedPlan, derive_seed, mix64, mix64_array


def test_derivation_is_stable_across_processes_and_versions():
    # A changed derivation silently changes every run's weights: pin one value.
    assert derive_seed(2333, "model") == SeedPlan(2333).model()
    assert derive_seed(0, "x") == derive_seed(0, "x")
    assert derive_seed(2333, "model") == 7447244261658782286


def test_no_collisions_across_seeds_streams_ranks_workers_and_epochs():
    seen: set[int] = set()
    count = 0
    for seed in range(200):
        plan = SeedPlan(seed)
        values = [plan.model()]
        values += [plan.order(epoch) for epoch in range(50)]
        values += [plan.aug_epoch_key(epoch) for epoch in range(50)]
        values += [plan.runtime(rank) for rank in range(64)]
        values += [plan.worker(rank, worker) for rank in range(64) for worker in range(16)]
        seen.update(values)
        count += len(values)
    assert len(seen) == count == 200 * (1 + 50 + 50 + 64 + 64 * 16)


def test_per_sample_seeds_do_not_collide_within_or_across_epochs():
    plan = SeedPlan(2333)
    keys = [plan.aug_epoch_key(epoch) for epoch in range(20)]
    seeds = {mix64(key, index) for key in keys for index in range(50_000)}
    assert len(seeds) == 20 * 50_000
    assert plan.aug(7, 123) == mix64(keys[7], 123)


def test_adjacent_user_seeds_are_unrelated():
    # seed + rank would make seed 2333 at rank 1 equal seed 2334 at rank 0.
    assert SeedPlan(2333).runtime(1) != SeedPlan(2334).runtime(0)
    assert SeedPlan(2333).order(1) != SeedPlan(2334).order(0)
    a = torch.Generator().manual_seed(SeedPlan(2333).model())
    b = torch.Generator().manual_seed(SeedPlan(2334).model())
    x, y = torch.rand(10_000, generator=a), torch.rand(10_000, generator=b)
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.05


def test_index_arity_is_part_of_the_stream():
    assert derive_seed(1, "s", 1) != derive_seed(1, "s", 1, 0)
    assert derive_seed(1, "s") != derive_seed(1, "s", 0)


def test_overrides_vary_one_stream_alone():
    base, varied = SeedPlan(2333), SeedPlan(2333, model_seed=7)
    assert varied.model() == SeedPlan(7).model()
    assert varied.order(3) == base.order(3) and varied.aug(3, 5) == base.aug(3, 5)
    assert SeedPlan(2333, aug_seed=7).aug(1, 2) == SeedPlan(7).aug(1, 2)
    assert SeedPlan(2333, order_seed=7).order(1) == SeedPlan(7).order(1)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_extreme_seeds_work(seed):
    assert seed_everything(seed, rank=0)["seed"] == seed
    assert 0 <= derive_seed(seed, "model") < 2**64


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3", True, None])
def test_bad_seeds_raise_with_the_valid_range(bad):
    with pytest.raises(ValueError, match=r"4294967295"):
        seed_everything(bad, rank=0)


def test_seed_everything_sets_every_generator_and_reports_it():
    reported = seed_everything(5, rank=3)
    assert reported == {"seed": 5, "rank": 3, "runtime_seed": derive_seed(5, "runtime", 3)}
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5, rank=3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    seed_everything(5, rank=2)
    assert torch.rand(1).item() != draws[2]


def test_seed_generators_keeps_all_64_bits_for_numpy():
    seed_generators(1)
    low = np.random.rand()
    seed_generators(1 + 2**32)
    assert np.random.rand() != low


def test_mix64_is_injective_on_indices():
    assert len({mix64(123, i) for i in range(100_000)}) == 100_000


def test_mix64_array_equals_mix64_element_by_element():
    keys = np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)
    indices = np.array([0, 5, 2**32 - 1, 2**64 - 2], dtype=np.uint64)
    mixed = mix64_array(keys[:, None], indices[None, :])
    assert mixed.dtype == np.uint64
    assert [[int(v) for v in row] for row in mixed] == [[mix64(int(k), int(i)) for i in indices] for k in keys]
    plan = SeedPlan(2333)
    assert [int(v) for v in plan.aug_array(3, np.arange(10))] == [plan.aug(3, i) for i in range(10)]


@pytest.mark.parametrize("bad", [np.array([-1]), np.array([0.5])])
def test_mix64_array_refuses_negative_or_fractional_indices(bad):
    with pytest.raises(ValueError, match="indices must be"):
        mix64_array(1, bad)


def test_the_plan_and_the_plain_int_seed_exactly_as_before():
    """The numbers the int entry points gave before the plan carried the seed (pinned),
    through both entry points: the weights of every run stay bitwise what they were."""
    plan = SeedPlan(2333, order_seed=7)
    for seed in (plan, 2333):
        assert seed_everything(seed, rank=1)["runtime_seed"] == 5326005882459196407
        assert torch.rand(2).tolist() == [0.08759498596191406, 0.4397849440574646]
        WorkerSeeder(seed, rank=1)(3)
        assert random.random() == 0.11319070764506256
    assert plan.worker(1, 3) == 4616214406468206064
    for generator in (plan.generator("train_loader", 1), make_generator(2333, "train_loader", 1)):
        assert generator.initial_seed() == 11262519514528475884
    for generator in (plan.generator("test_loader", 0), make_generator(2333, "test_loader", 0)):
        assert torch.rand(2, generator=generator).tolist() == [0.8566357493400574, 0.479353666305542]
    for order_seed in (plan, 7):  # the plan's order_seed override is the order stream's seed
        sampler = GlobalBatchSampler(100, 10, order_seed, rank=1, world_size=2)
        assert sampler.epoch_order(0)[:6].tolist() == [73, 93, 46, 90, 0, 47]
        assert next(iter(sampler)) == [(0, 47), (0, 43), (0, 78), (0, 5), (0, 72)]
        assert sampler.state_dict(0)["seed"] == 7


def _stream_arguments(tree: ast.AST) -> list[ast.expr]:
    """The stream argument of each derive_seed / make_generator / .generator / .loader call."""
    found = []
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
        position = {"derive_seed": 1, "make_generator": 1, "generator": 0, "loader": 0}.get(name)
        if position is not None and len(call.args) > position:
            found.append(call.args[position])
    return found


def test_every_stream_is_named_once_and_listed_in_the_table():
    sources = [*sorted((REPO / "repro").glob("*.py")), *sorted((REPO / "cifar").glob("*.py")), REPO / "train.py"]
    literals = [
        f"{path.name}:{argument.lineno}: {argument.value!r}"
        for path in sources
        for argument in _stream_arguments(ast.parse(path.read_text()))
        if isinstance(argument, ast.Constant) and isinstance(argument.value, str)
    ]
    assert literals == [], "stream names must come from repro.seeds' constants"
    table = [line.split("|")[1].strip().strip("`") for line in repro.seeds.__doc__.splitlines() if line[:3] == "| `"]
    assert table == list(STREAMS)
    assert all(getattr(repro.seeds, f"{stream.upper()}_STREAM") == stream for stream in STREAMS)


# The device pipeline draws from no loader generator, and its manifest lists none.
LOADERS_OF_RUN = [("reference_run", []), ("dataloader_run", ["train_loader", "test_loader"])]


@pytest.mark.parametrize(("run", "loaders"), LOADERS_OF_RUN)
def test_the_manifest_records_the_seeds_the_components_used(run: str, loaders: list[str], request):
    manifest = read_manifest(request.getfixturevalue(run))
    recorded, config = manifest["seeds"], manifest["config"]
    plan = SeedPlan(config["seed"], config["model_seed"], config["order_seed"], config["aug_seed"])
    assert recorded["runtime_rank0"] == seed_everything(plan, rank=0)["runtime_seed"]
    used = {f"{name}_rank0": plan.generator(name, 0) for name in loaders}
    assert {name: recorded.get(name) for name in used} == {name: g.initial_seed() for name, g in used.items()}
    sampler = GlobalBatchSampler(config["synthetic_train_size"], config["batch_size"], plan)
    order = torch.randperm(
        config["synthetic_train_size"], generator=torch.Generator().manual_seed(recorded["order_epoch0"])
    )
    assert torch.equal(sampler.epoch_order(0), order[: len(sampler) * config["batch_size"]])
    assert recorded == plan.as_dict(0)
