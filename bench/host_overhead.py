"""train.py's host time per training step, with the model's and the data's compute made negligible.

On a GPU the host queues each step's work and moves on; whatever it spends per
step beyond the GPU's time for that step leaves the GPU idle. This measures
that host time: train.py's own loop (``train.train``: the sampler, the device
pipeline's ``DeviceTrainBatches`` with its per-sample seeds, index handling and
augmentation, ``training_step``, the optimizer and scheduler, the lookahead,
the loss accumulation, the stop check and the progress bar) with the settings
of ``--config`` (the speedrun recipe's by default: batch 1024, its
augmentation, optimizer, schedule and lookahead), on a trivial model (one
linear layer on the flattened image) and on images of ``--side`` x ``--side``
pixels (3 by default, the least the recipe's reflect padding of 2 allows), so
that little is left but the Python and dispatch work of each step. Target
(issue 12): at most 1 ms per step. For scale, a whole airbench94 step takes
about 4.5 ms on an H100. Beside it runs a bare hand-written loop over the same
model, optimizer and schedule, its batches made beforehand: the host time that
any loop of this model and optimizer spends.

The figure is this thread's CPU time (``time.thread_time``) from the request
of an epoch's first batch to the end of its last step, over its steps: on a
shared machine, time spent waiting for a core is left out. It includes the
per-epoch work (the epoch's permutation, seeds and augmentation, which the
device pipeline does for the whole epoch at once) and, on a CPU, what compute
remains: the operations over the epoch's samples, which a GPU does on the
device. The parts of the step are clocked the same way where the loop calls
them (wrapped for the run: about a µs each), and the per-sample seeds apart.
Torch runs one thread (``--threads``): the operations are too small for more
to help, and a thread waiting for another that the machine has descheduled
would count as work.

Where CUDA is available it runs there, like train.py; the trivial model's
kernels then take less time than their launch, and the figures are the host's,
launches included.

    python bench/host_overhead.py
    python bench/host_overhead.py --steps 50 --repeats 7
    python bench/host_overhead.py --profile 25     # also cProfile one epoch: the 25 costliest functions
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import io
import json
import pstats
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median
from typing import Any

import benchlib
import numpy as np
import torch
from torch import nn

import train
from cifar.build import build_loaders, make_accelerator, prepare_training
from cifar.checkpoint import Progress, Training
from cifar.config import TrainConfig, parse_config
from cifar.data import ImageArray, Splits
from cifar.device_data import augmentation_params
from cifar.loss import label_smoothed_cross_entropy
from cifar.optim import build_optimizer
from cifar.outputs import MetricsLog
from repro.fingerprint import environment_fingerprint
from repro.seeds import SeedPlan
from repro.stop import GracefulStop

NUM_CLASSES = 10
WHOLE_STEP, NEXT_BATCH, BATCH, TRAINING_STEP = "whole step", "next batch", "DeviceTrainBatches.batch", "training_step"
FINISH_EPOCH = "finish_epoch"  # the epoch's evaluation and checkpoint: per-epoch work, left out of the step
OPTIMIZER = ("optimizer.step", "scheduler.step", "optimizer.zero_grad")
REST = "rest"


def tiny_splits(train_size: int, side: int) -> Splits:
    """Random uint8 images of ``side`` x ``side`` pixels: data whose augmentation costs next to nothing."""
    generator = torch.Generator().manual_seed(0)

    def split(count: int) -> ImageArray:
        images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)
        return ImageArray(images, torch.randint(0, NUM_CLASSES, (count,), generator=generator))

    return Splits(split(train_size), split(64), NUM_CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def build(args: argparse.Namespace, run_dir: Path) -> tuple[Training, train.Batches, train.Batches]:
    """train.py's training objects, as its ``main`` builds them from ``--config``, around a one-layer model."""
    config = parse_config(
        [
            *("--config", args.config, "--dataset", "synthetic", "--data-pipeline", "device"),
            *("--batch-size", str(args.batch_size), "--epochs", str(args.repeats)),
            *("--determinism", args.determinism, "--output-dir", str(run_dir)),
            *(("--mixed-precision", args.mixed_precision) if args.mixed_precision else ()),
        ]
    )
    run_dir.mkdir(parents=True)
    accelerator = make_accelerator(config, run_dir)
    seeds = SeedPlan(config.seed)
    splits = tiny_splits(args.steps * args.batch_size, args.side)
    train_batches, sampler, test_batches = build_loaders(config, splits, seeds, accelerator)
    model = trivial_model(config, accelerator.device, args.side)
    environment = environment_fingerprint(accelerator.num_processes, benchlib.REPO)
    training = prepare_training(config, run_dir, accelerator, model, sampler, splits, environment)
    return training, train_batches, test_batches


def trivial_model(config: TrainConfig, device: torch.device, side: int) -> nn.Module:
    """One linear layer on the flattened image, on ``device``."""
    torch.manual_seed(config.seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side**2, NUM_CLASSES)).to(device)


def bare_loop(args: argparse.Namespace, config: TrainConfig, device: torch.device, precision: str) -> list[float]:
    """CPU µs per step of a hand-written loop over the same model and batches: forward (in the
    run's autocast), loss, backward, optimizer and scheduler steps, zero_grad. Its batches are
    made before the clock starts: what no loop can do with less host work. One figure an epoch."""
    model = trivial_model(config, device, args.side)
    optimizer, scheduler = build_optimizer(config, model, args.steps)
    criterion = functools.partial(label_smoothed_cross_entropy, smoothing=config.label_smoothing)
    images = torch.randn(args.steps * args.batch_size, 3, args.side, args.side, device=device)
    labels = torch.randint(0, NUM_CLASSES, (len(images),), device=device)
    batches = list(zip(images.split(args.batch_size), labels.split(args.batch_size), strict=True))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    per_step = []
    for _ in range(args.repeats):
        start = time.thread_time()
        for batch_images, batch_labels in batches:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = criterion(model(batch_images), batch_labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        per_step.append((time.thread_time() - start) / args.steps * 1e6)
    return per_step


class Clock:
    """This thread's CPU time (``time.thread_time``) spent in the callables it wraps, by name."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    def wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.thread_time() - start

        return timed


class TimedBatches:
    """Training batches that clock each epoch: the whole iteration, from the request of
    its first batch to the end of its last step, and the making of each batch. At the
    end of an epoch the clock's figures are kept in ``epochs`` and reset."""

    def __init__(self, batches: train.Batches, clock: Clock) -> None:
        self.batches = batches
        self.clock = clock
        self.epochs: list[dict[str, float]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = time.thread_time()
        next_batch = self.clock.wrap(NEXT_BATCH, next)
        iterator = iter(self.batches)
        while (batch := next_batch(iterator, None)) is not None:
            yield batch
        # train.py closes an epoch after its last step, before asking for the end of its batches.
        self.clock.seconds[WHOLE_STEP] = time.thread_time() - start - self.clock.seconds[FINISH_EPOCH]
        self.epochs.append(dict(self.clock.seconds))
        self.clock.seconds.clear()


def loop(args: argparse.Namespace, run_dir: Path) -> tuple[list[dict[str, float]], list[float], Training]:
    """Run ``--repeats`` epochs of train.py's loop, clocking its parts where the loop calls them.

    Returns, per epoch, µs per step of the whole step and of each part, and
    the wall time per step of train.py's own ``train_s``; and the training objects.
    """
    training, train_batches, test_batches = build(args, run_dir)
    clock = Clock()
    timed = TimedBatches(train_batches, clock)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    loss_sum = torch.zeros((), device=training.accelerator.device)
    # The scheduler is wrapped on its class for the run (as an instance attribute the
    # wrapper would end up in its checkpointed state); the optimizer on the instance
    # train.py calls (torch's own when there is no scaler), whose step accelerate has
    # already replaced by an instance attribute; training_step and finish_epoch
    # through train.py's module.
    optimizer = training.optimizer if training.accelerator.scaler is not None else training.optimizer.optimizer
    wrapped = [
        (type(train_batches), "batch", BATCH),
        (optimizer, "step", OPTIMIZER[0]),
        (type(training.scheduler), "step", OPTIMIZER[1]),
        (optimizer, "zero_grad", OPTIMIZER[2]),
        (train, "training_step", TRAINING_STEP),
        (train, "finish_epoch", FINISH_EPOCH),
    ]
    with contextlib.ExitStack() as undo:
        for owner, name, label in wrapped:
            original = getattr(owner, name)
            setattr(owner, name, clock.wrap(label, original))
            undo.callback(setattr, owner, name, original)
        stop = undo.enter_context(GracefulStop())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.train(training, timed, test_batches, metrics, Progress(), loss_sum, None, stop)
    records = [json.loads(line) for line in metrics.path.read_text().splitlines()]
    per_step = [{name: seconds / args.steps * 1e6 for name, seconds in epoch.items()} for epoch in timed.epochs]
    return per_step, [record["train_s"] / args.steps * 1e6 for record in records], training


def seeds_alone(args: argparse.Namespace, config: TrainConfig, calls: int = 20) -> float:
    """µs per step of the per-sample seeds and the augmentation parameters the recipe uses
    (NumPy, derived for a whole epoch at once, as the device pipeline does), timed alone."""
    seeds = SeedPlan(0)
    indices = np.arange(args.steps * args.batch_size, dtype=np.int64)
    flip, cutout = config.flip == "random", config.cutout > 0

    def derive() -> None:
        augmentation_params(
            seeds.aug_array(0, indices), args.side, args.side, config.crop_padding, flip=flip, cutout=cutout
        )

    derive()
    start = time.thread_time()
    for _ in range(calls):
        derive()
    return (time.thread_time() - start) / calls / args.steps * 1e6


def profile(args: argparse.Namespace, run_dir: Path, top: int) -> None:
    """cProfile one epoch of train.py's loop and print the ``top`` functions by own time."""
    one_epoch = argparse.Namespace(**{**vars(args), "repeats": 1})
    profiler = cProfile.Profile()
    profiler.enable()
    loop(one_epoch, run_dir / "profile")
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    print(
        f"\n# cProfile of one epoch ({args.steps} steps and one evaluation): the {top} costliest functions by own time"
    )
    stats.sort_stats("tottime").print_stats(top)
    print(stats.stream.getvalue())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=str(benchlib.SPEEDRUN_CONFIG), help="the recipe whose loop is run, its model aside"
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch (the speedrun recipe's)")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="epochs of the whole loop; each gives a figure")
    parser.add_argument(
        "--side",
        type=int,
        default=3,
        help="image side in pixels: small makes compute negligible (reflect padding 2 needs 3)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--determinism", default="strict", choices=["strict", "warn", "off"])
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        help="the config's by default (auto: bf16 on CUDA, fp32 on the CPU); bf16 on the CPU runs the step "
        "in autocast as on a GPU",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also cProfile one epoch, top N")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = benchlib.start(args.determinism)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"# {args.config}'s loop, batch {args.batch_size}, {args.steps} steps an epoch, {args.side}x{args.side} "
        f"images, a one-layer model, the device pipeline on {device}, --determinism {args.determinism}, "
        f"{args.threads} torch threads, --mixed-precision {args.mixed_precision or 'of the config'}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-host-") as scratch:
        epochs, wall, training = loop(args, Path(scratch) / "loop")
        if args.profile:
            profile(args, Path(scratch), args.profile)
    bare = bare_loop(args, training.config, training.accelerator.device, training.accelerator.mixed_precision)
    seeds = seeds_alone(args, training.config)
    for epoch in epochs:
        epoch[REST] = epoch[WHOLE_STEP] - sum(epoch.get(name, 0.0) for name in (NEXT_BATCH, TRAINING_STEP, *OPTIMIZER))

    def row(label: str, values: list[float]) -> list[str]:
        return [label, f"{median(values):.0f}", " ".join(f"{v:.0f}" for v in values) if len(values) > 1 else ""]

    def part(name: str) -> list[float]:
        return [epoch.get(name, 0.0) for epoch in epochs]

    rows = [
        row("train.py's loop, whole step (CPU time)", part(WHOLE_STEP)),
        row("  the same, wall time (train.py's train_s)", wall),
        row("next batch (DeviceTrainBatches iteration)", part(NEXT_BATCH)),
        row("  of which DeviceTrainBatches.batch", part(BATCH)),
        row("    of which the seeds and augmentation parameters (timed alone)", [seeds]),
        row("training_step (forward, loss, backward)", part(TRAINING_STEP)),
        *(row(f"{name}()", part(name)) for name in OPTIMIZER),
        row("the rest: loss sum, stop check, lookahead, progress bar, bookkeeping", part(REST)),
        row("a bare hand-written loop's step, its batches made beforehand (CPU time)", bare),
    ]
    print()
    benchlib.print_table(["per step", "µs (median)", "µs each epoch"], rows)
    if args.batch_size == 1024:
        whole = median(e[WHOLE_STEP] for e in epochs)
        print(f"\ntarget, at most 1000 µs per step: {'met' if whole <= 1000 else 'not met'}")
        print(f"train.py's loop / the bare loop, host time per step: {whole / median(bare):.2f}")
        # On a CPU the next batch is mostly the compute of the epoch's augmentation, which a GPU does on the device.
        stepping = median(e[WHOLE_STEP] - e.get(NEXT_BATCH, 0.0) for e in epochs)
        print(f"the same, the next batch left out: {stepping / median(bare):.2f}")
    benchlib.write_json(
        args.json,
        {
            "environment": info,
            "settings": vars(args),
            "us_per_step": epochs,
            "wall_us_per_step": wall,
            "bare_us_per_step": bare,
            "seeds_us": seeds,
        },
    )


if __name__ == "__main__":
    main()
