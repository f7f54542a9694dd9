"""Throughput of train.py's training batches: the DataLoader at 0, 1 and 2 workers, and the device pipeline.

The batches are the ones train.py trains from, built by its own
``cifar.build.build_loaders`` in its default strict mode: the DataLoader pipeline
(per-sample seeded augmentation, the seeded global batch sampler, worker
seeding) at each worker count, and ``--data-pipeline device`` (the images on
the device, augmented there in batches; on the CPU here, on the GPU when CUDA
is available). The data is a CIFAR-sized training set: 50,000 synthetic
3x32x32 images by default, or the training images of a folder in
``train/<class>/*`` layout. Only loading is timed: batches are produced and
dropped, no model runs. Each DataLoader figure excludes the first batch
(worker start-up and the first fetch, reported apart); the device pipeline's
covers a whole epoch, as it augments the epoch's images at once when the epoch
starts. The loaders alternate between repetitions, and the table gives
medians.

    python bench/loader_throughput.py
    python bench/loader_throughput.py --image-folder /tmp/cifar10-jpeg
    python bench/loader_throughput.py --workers 0,8,16,device    # on a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from statistics import median

import benchlib
import torch
from accelerate import Accelerator

from cifar.build import build_loaders
from cifar.config import TrainConfig
from cifar.data import Splits, imagefolder, synthetic
from repro.seeds import SeedPlan


def measure(config: TrainConfig, splits: Splits, accelerator: Accelerator, batches: int) -> dict[str, float]:
    """Start-up seconds to the first batch, then images/s: over the next ``batches`` for the
    DataLoader, over the whole epoch for the device pipeline (its first batch queues the
    epoch's augmentation on the device, which the later batches only slice)."""
    started = time.perf_counter()
    loader, _, _ = build_loaders(config, splits, SeedPlan(config.seed), accelerator)
    built = time.perf_counter()
    iterator = iter(loader)
    _, first_labels = next(iterator)
    synchronize(accelerator.device)
    first = time.perf_counter()
    if config.data_pipeline == "device":
        images, timed_from = len(first_labels) + sum(len(labels) for _, labels in iterator), built
    else:
        images, timed_from = sum(len(labels) for _, labels in itertools.islice(iterator, batches)), first
    synchronize(accelerator.device)
    return {"first_batch_s": first - started, "images_per_s": images / (time.perf_counter() - timed_from)}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-folder", help="train/<class>/* images instead of synthetic ones")
    parser.add_argument(
        "--train-size", type=benchlib.positive_int, default=50000, help="synthetic training images (CIFAR's count)"
    )
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=512, help="train.py's default")
    parser.add_argument("--batches", type=benchlib.positive_int, default=12, help="timed batches per measurement")
    parser.add_argument(
        "--workers", default="0,1,2,device", help="comma-separated DataLoader worker counts, and device"
    )
    parser.add_argument("--repeats", type=benchlib.positive_int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    for name in args.workers.split(","):
        if name != "device" and not name.isdigit():
            parser.error(f"--workers takes worker counts and 'device', not {name!r}")
    return args


def main() -> None:
    args = parse_args()
    base = TrainConfig(batch_size=args.batch_size, data_pipeline="dataloader")
    # First, as train.py does: strict mode sets CUBLAS_WORKSPACE_CONFIG before CUDA starts, and the
    # workers inherit the mode.
    info = benchlib.start(base.determinism)
    if args.image_folder:
        splits, source = imagefolder(args.image_folder), args.image_folder
    else:
        splits, source = synthetic(args.train_size, 64), "synthetic"
    print(
        f"# {len(splits.train)} training images ({source}), batch {args.batch_size}, {args.batches} timed batches "
        "(the device pipeline: an epoch)"
    )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    configs = {}
    for name in args.workers.split(","):
        if name == "device":
            configs[f"device pipeline ({accelerator.device.type})"] = dataclasses.replace(base, data_pipeline="device")
        else:
            configs[f"{name} workers"] = dataclasses.replace(base, num_workers=int(name))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        for name in configs if repeat % 2 == 0 else reversed(configs):
            results[name].append(measure(configs[name], splits, accelerator, args.batches))
            print(f"{name}: {results[name][-1]['images_per_s']:.0f} img/s", flush=True)
    rows = [
        [
            name,
            f"{median(r['images_per_s'] for r in runs):.0f}",
            f"{median(r['first_batch_s'] for r in runs):.2f}",
            " ".join(f"{r['images_per_s']:.0f}" for r in runs),
        ]
        for name, runs in results.items()
    ]
    print()
    benchlib.print_table(["batches from", "img/s (median)", "first batch s", "img/s each repetition"], rows)
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), "source": source, "results": results})


if __name__ == "__main__":
    main()
