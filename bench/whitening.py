"""The speedrun net's whitening initialisation: its time, and against the layout it replaced.

train.py sets the whitening layer of ``model: speedrun`` before training starts,
on the run's device: ``SpeedrunNet.init_whitening`` over 5,000 normalised
training images, their covariance in float64 there, its eigendecomposition on
the host (at the config's torch thread count, ``cpu_threads``, 1 by default).
airbench94 counts its own whitening in a run's time, so the GPU check (stage f)
adds this figure, taken on the GPU (``--device cuda``), to the recipe's GPU
seconds; it includes copying the images to the device. The covariance on the
device is timed against the layout ``init_whitening`` used before on the host
(one row per patch, ``covariance_one_row_per_patch`` here), in alternating
repetitions. Both must give the same covariance up to float64 rounding: bit
for bit on the host of the 2-core AMD EPYC of BENCHMARKS.md, not on the H200
machine's Xeon, whose matrix products sum in another order (BENCHMARKS.md,
section 7.1); the bench reports which, and the largest difference. The
figures: ``init_whitening``'s median seconds, and the median of the
per-repetition ratios, old covariance over new.

    python bench/whitening.py                                # normally distributed images
    python bench/whitening.py --folder /tmp/cifar10-jpeg     # 5,000 of its training images
    python bench/whitening.py --device cuda                  # as train.py on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import benchlib
import torch

from cifar import data_cache
from cifar.build import WHITENING_IMAGES
from cifar.data import imagefolder
from cifar.device_data import normalize
from cifar.models import SpeedrunNet, patch_covariance


def covariance_one_row_per_patch(images: torch.Tensor) -> torch.Tensor:
    """The whitening layer's covariance as init_whitening computed it before: one row per 2x2 patch."""
    kernel, size = SpeedrunNet.WHITEN_KERNEL, 3 * SpeedrunNet.WHITEN_KERNEL**2
    covariance = torch.zeros(size, size, dtype=torch.float64)
    count = 0
    for chunk in images.to(torch.float64).split(512):
        patches = chunk.unfold(2, kernel, 1).unfold(3, kernel, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, size)
        covariance += patches.T @ patches
        count += len(patches)
    return covariance / count


# Largest difference, relative to the covariance's largest entry, that float64 rounding
# explains: the same sum over 5,000 noise images in reverse order differs by about 6e-15;
# two patch elements swapped by a wrong layout, by about 2e-3 (tests/test_speedrun.py).
ROUNDING = 1e-9


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest entry of ``|a - b|``, relative to the largest entry of ``|a|``."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(torch.finfo(a.dtype).tiny)).item()


def training_images(folder: Path | None) -> torch.Tensor:
    """5,000 normalised images, chosen as train.py chooses them (with a fixed seed) from the
    folder's training split, or normal noise."""
    chooser = torch.Generator().manual_seed(0)
    if folder is None:
        return torch.randn(WHITENING_IMAGES, 3, 32, 32, generator=chooser)
    splits = imagefolder(str(folder), data_cache.cache_dir("auto"))
    chosen = torch.randperm(len(splits.train), generator=chooser)[:WHITENING_IMAGES].sort().values
    stats = [torch.tensor(values).view(1, -1, 1, 1) for values in (splits.mean, splits.std)]
    return normalize(splits.train.images[chosen], *stats)


def seconds(device: torch.device, function: Callable[..., object], *args: object) -> float:
    """Wall seconds of ``function(*args)``, with the work it queued on ``device`` done."""
    start = time.perf_counter()
    function(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an image folder (train/<class>/*); default: normal noise")
    parser.add_argument("--repeats", type=benchlib.positive_int, default=3, help="alternating repetitions of each")
    parser.add_argument(
        "--threads", type=benchlib.positive_int, default=1, help="torch threads (train.py: cpu_threads, default 1)"
    )
    parser.add_argument("--device", default="cpu", help="where the covariance is computed (train.py: the run's device)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    info = benchlib.start("strict")
    images = training_images(args.folder)
    on_device = images.to(device)
    kernel = SpeedrunNet.WHITEN_KERNEL
    now_covariance = patch_covariance(on_device, kernel).cpu()
    before_covariance = covariance_one_row_per_patch(images)
    bitwise = torch.equal(now_covariance, before_covariance)
    difference = largest_difference(before_covariance, now_covariance)
    if difference > ROUNDING:
        raise SystemExit(f"the two layouts gave different covariances: largest relative difference {difference:.3g}")
    model = SpeedrunNet()
    whole, now, before = [], [], []
    for _ in range(args.repeats):
        whole.append(seconds(device, lambda: model.init_whitening(images.to(device))))
        now.append(seconds(device, patch_covariance, on_device, kernel))
        before.append(seconds(torch.device("cpu"), covariance_one_row_per_patch, images))
    rows = [
        [f"init_whitening on {device.type}, the copy to it included", *whole],
        [f"its covariance (patch_covariance) on {device.type}", *now],
        ["the covariance, one row per patch, on the host", *before],
    ]
    benchlib.print_table(
        ["seconds", *(f"run {i + 1}" for i in range(args.repeats))],
        [[name, *(f"{value:.3f}" for value in values)] for name, *values in rows],
    )
    ratio = benchlib.median_ratio(before, now)
    same = "bit for bit" if bitwise else f"up to rounding (largest relative difference {difference:.3g})"
    print(f"same covariance, {same}; one row per patch / now: {ratio:.2f}x")
    benchlib.write_json(
        args.json,
        {
            "environment": info,
            "images": "folder" if args.folder else "normal noise",
            "threads": args.threads,
            "device": device.type,
            "covariances_bitwise_equal": bitwise,
            "covariances_largest_relative_difference": difference,
            "init_whitening_s": whole,
            "patch_covariance_s": now,
            "one_row_per_patch_s": before,
            "median_init_whitening_s": statistics.median(whole),
            "ratio": ratio,
        },
    )


if __name__ == "__main__":
    main()
