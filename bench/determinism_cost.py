"""What reproducibility costs on this machine, as ratios measured in one run.

1. Strict against off determinism (``repro.determinism.configure_determinism``),
   and strict with torch's filling of uninitialised memory, which strict mode
   leaves off (``benchlib.set_determinism``), to show what it costs: the training
   step (forward, backward, SGD with Nesterov momentum) of each model on a
   fixed random batch, and train.py's loader with 2 workers (they inherit the
   mode), switching the mode between timed blocks.
2. Per-sample augmentation seeding against plain worker seeding: the training
   set as train.py wraps it (``repro.augment.SeededAugmentation``, indexed by
   ``repro.loader.GlobalBatchSampler``) against a plain Dataset applying the
   same transform behind ``DataLoader(shuffle=True)``, both with
   ``repro.loader.WorkerSeeder``:

   - loader throughput (batches produced, no training) at 0 and 2 workers,
     for train.py's ``SeededAugmentation(generators=("torch",))`` (its
     transforms draw from torch alone) and for the library's default, which
     also reseeds ``random`` and NumPy (and in the main process saves and
     restores them around each sample);
   - training throughput (loader and step) at 0 workers, where the seeding runs
     in the training process itself;
   - where the time goes: microseconds per call of the augmentation and of
     each part of the seeding, in this process (one thread's view).

Blocks alternate between the sides, in reverse order every other repetition
(ABBA), so that a drift in the machine's load falls on all; each figure is the
median of the per-repetition ratios. Target on a CPU: every ratio within 3% of 1.

    python bench/determinism_cost.py
    python bench/determinism_cost.py --steps small_cnn:512,resnet18:32 --repeats 4
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
import timeit
from collections.abc import Callable, Iterable
from statistics import median
from typing import Any

import benchlib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cifar.data import TRAIN_TRANSFORM_GENERATORS, Splits, Transformed, synthetic, train_transform
from cifar.models import build_model
from repro.augment import GENERATORS, SeededAugmentation, seed_sample_generators
from repro.loader import GlobalBatchSampler, WorkerSeeder, make_generator
from repro.seeds import TRAIN_LOADER_STREAM, SeedPlan

SEED = 2333


def make_step(model_name: str, num_classes: int = 10) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A training step as train.py takes it: cross-entropy, backward, SGD with Nesterov momentum."""
    torch.manual_seed(SEED)
    model = build_model(model_name, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_s(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int, step: Callable | None) -> float:
    """Consume ``count`` batches (training on each if ``step`` is given) and return images/s."""
    images = 0
    start = time.perf_counter()
    for inputs, labels in itertools.islice(batches, count):
        if step is not None:
            step(inputs, labels)
        images += len(labels)
    return images / (time.perf_counter() - start)


def alternate(repeats: int, sides: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Measure each side ``repeats`` times, reversing the order every other repetition."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            results[name].append(sides[name]())
    return results


def seeded_loader(
    splits: Splits, batch_size: int, workers: int, *, generators: tuple[str, ...] = TRAIN_TRANSFORM_GENERATORS
) -> DataLoader:
    """The training loader as train.py builds it, for one process."""
    plan = SeedPlan(SEED)
    dataset = SeededAugmentation(splits.train, train_transform(splits, cutout=0), plan, generators=generators)
    return DataLoader(
        dataset,
        batch_sampler=GlobalBatchSampler(len(dataset), batch_size, plan),
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=WorkerSeeder(plan),
        generator=plan.generator(TRAIN_LOADER_STREAM),
    )


def plain_loader(splits: Splits, batch_size: int, workers: int) -> DataLoader:
    """The usual loader: a Dataset applying the transform, shuffled, workers seeded once each."""
    return DataLoader(
        Transformed(splits.train, train_transform(splits, cutout=0)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=WorkerSeeder(SEED),
        generator=make_generator(SEED, TRAIN_LOADER_STREAM, 0),
    )


def loader_block(make_loader: Callable[[], DataLoader], batches: int, step: Callable | None) -> Callable[[], float]:
    """A timed pass over ``batches`` batches of a fresh loader (training on each if ``step`` is given)."""

    def measure() -> float:
        loader = iter(make_loader())
        next(loader)  # not timed: worker start-up and the first fetch
        return images_per_s(loader, batches, step)

    return measure


def step_block(step: Callable, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> Callable[[], float]:
    """A timed block of ``steps`` training steps on one fixed batch."""

    def measure() -> float:
        step(*batch)  # not timed: the first step after a switch of mode may choose other kernels
        return images_per_s(itertools.repeat(batch), steps, step)

    return measure


def in_mode(mode: str, measure: Callable[[], float]) -> Callable[[], float]:
    """``measure`` under determinism ``mode`` (DataLoader workers inherit it when they start)."""

    def measure_in_mode() -> float:
        benchlib.set_determinism(mode)
        return measure()

    return measure_in_mode


def strict_vs_off(args: argparse.Namespace, splits: Splits) -> list[dict[str, Any]]:
    """Throughput of training steps, and of train.py's loader, under each determinism mode."""
    cases = {}
    for spec in args.steps.split(","):
        model_name, batch_size = spec.split(":")
        step = make_step(model_name)
        generator = torch.Generator().manual_seed(SEED)
        batch = (
            torch.randn(int(batch_size), 3, 32, 32, generator=generator),
            torch.randint(0, 10, (int(batch_size),), generator=generator),
        )
        # Warm-up (allocator, thread pool), which also sizes the blocks: about --block-seconds each.
        warmup_rate = in_mode("off", step_block(step, batch, 2))()
        steps = max(1, round(args.block_seconds * warmup_rate / int(batch_size)))
        cases[f"step {model_name}, batch {batch_size}"] = step_block(step, batch, steps)
    cases["train.py's loader, 2 workers"] = loader_block(
        lambda: seeded_loader(splits, args.batch_size, 2), args.batches, None
    )
    rows = []
    for case, measure in cases.items():
        results = alternate(args.repeats, {mode: in_mode(mode, measure) for mode in benchlib.DETERMINISM_MODES})
        for mode in ("strict", "strict+fill"):
            ratio = benchlib.median_ratio(results[mode], results["off"])
            rows.append(
                {"case": case, "side": mode, "images_per_s": results[mode], "baseline": results["off"], "ratio": ratio}
            )
            print(f"{mode}/off, {case}: {ratio:.3f}", flush=True)
    benchlib.set_determinism("strict")
    return rows


def seeding_cost(args: argparse.Namespace, splits: Splits) -> list[dict[str, Any]]:
    """Per-sample seeding against plain worker seeding, for loading alone and for training
    (in strict mode, as train.py runs by default)."""
    step = make_step("small_cnn")
    size, count = args.batch_size, args.batches
    cases = {
        "load, 0 workers": {
            "seeded": loader_block(lambda: seeded_loader(splits, size, 0), count, None),
            "plain": loader_block(lambda: plain_loader(splits, size, 0), count, None),
            "seeded, all generators": loader_block(
                lambda: seeded_loader(splits, size, 0, generators=GENERATORS), count, None
            ),
        },
        "load, 2 workers": {
            "seeded": loader_block(lambda: seeded_loader(splits, size, 2), count, None),
            "plain": loader_block(lambda: plain_loader(splits, size, 2), count, None),
            "seeded, all generators": loader_block(
                lambda: seeded_loader(splits, size, 2, generators=GENERATORS), count, None
            ),
        },
        "train small_cnn, 0 workers": {
            "seeded": loader_block(lambda: seeded_loader(splits, size, 0), count, step),
            "plain": loader_block(lambda: plain_loader(splits, size, 0), count, step),
        },
    }
    rows = []
    for case, sides in cases.items():
        results = alternate(args.repeats, sides)
        for side in sides:
            if side != "plain":
                ratio = benchlib.median_ratio(results[side], results["plain"])
                rows.append(
                    {
                        "case": case,
                        "side": side,
                        "images_per_s": results[side],
                        "baseline": results["plain"],
                        "ratio": ratio,
                    }
                )
                print(f"{side}/plain, {case}: {ratio:.3f}", flush=True)
    return rows


def per_call_costs(splits: Splits, calls: int = 2000) -> dict[str, float]:
    """Microseconds per call of the augmentation and of each part of per-sample seeding."""
    transform = train_transform(splits, cutout=0)
    image = splits.train.images[0]
    # The state SeededAugmentation saves and restores around each sample in the main
    # process when told to reseed NumPy: the bit generator's and the cached Gaussian.
    numpy_global = np.random.mtrand._rand

    def numpy_save_restore() -> None:
        numpy_global.set_state(numpy_global.get_state(legacy=False))

    parts = {
        "augmentation of one image (train_transform)": lambda: transform(image),
        "seed_sample_generators (torch, random, NumPy)": lambda: seed_sample_generators(SEED),
        "torch.default_generator get_state + set_state (main process)": lambda: torch.default_generator.set_state(
            torch.default_generator.get_state()
        ),
        "torch.default_generator.manual_seed alone": lambda: torch.default_generator.manual_seed(SEED),
        "NumPy state save + restore (main process)": numpy_save_restore,
        "random.getstate + setstate (main process)": lambda: random.setstate(random.getstate()),
    }
    return {name: timeit.timeit(call, number=calls) / calls * 1e6 for name, call in parts.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", default="small_cnn:512,resnet9:64", help="MODEL:BATCH,... training steps timed in each mode"
    )
    parser.add_argument("--block-seconds", type=float, default=3.0, help="length of one block of training steps")
    parser.add_argument(
        "--train-size", type=benchlib.positive_int, default=8192, help="synthetic images behind the loaders"
    )
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=256, help="loader batch size")
    parser.add_argument(
        "--batches", type=benchlib.positive_int, default=16, help="batches per loader block, after the first"
    )
    parser.add_argument("--repeats", type=benchlib.positive_int, default=6, help="blocks per side")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def print_rows(title: str, baseline: str, rows: list[dict[str, Any]]) -> None:
    benchlib.print_table(
        [title, "side", "img/s", f"{baseline} img/s", f"ratio to {baseline}"],
        [
            [
                r["case"],
                r["side"],
                f"{median(r['images_per_s']):.0f}",
                f"{median(r['baseline']):.0f}",
                f"{r['ratio']:.3f}",
            ]
            for r in rows
        ],
    )


def main() -> None:
    args = parse_args()
    info = benchlib.environment()
    benchlib.print_environment(info)
    splits = synthetic(args.train_size, 64)
    determinism = strict_vs_off(args, splits)
    seeding = seeding_cost(args, splits)
    costs = per_call_costs(splits)
    print()
    print_rows("determinism mode", "off", determinism)
    print()
    print_rows("per-sample seeding", "plain", seeding)
    print(
        f"(img/s: medians of {args.repeats} alternating blocks per side; "
        "ratios: medians of the per-repetition ratios; target >= 0.97)"
    )
    print()
    benchlib.print_table(["where the per-sample time goes", "µs per call"], [[k, f"{v:.1f}"] for k, v in costs.items()])
    benchlib.write_json(
        args.json,
        {
            "environment": info,
            "settings": vars(args),
            "strict_vs_off": determinism,
            "seeding": seeding,
            "us_per_call": costs,
        },
    )


if __name__ == "__main__":
    main()
