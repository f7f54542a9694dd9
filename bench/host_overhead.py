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
per-epoch work: the epoch's order and its samples' augmentation parameters,
arrays the host makes on any machine (timed apart as "host arrays"), and the
augmentation of the whole epoch at once, tensor operations that a GPU runs on
the device. The parts of the step are clocked the same way where the loop
calls them (wrapped for the run: about a µs each). Torch runs one thread
(``--threads``): the operations are too small for more to help, and a thread
waiting for another that the machine has descheduled would count as work.

Where CUDA is available it runs there, like train.py; the trivial model's
kernels then take less time than their launch, and the figures are the host's,
launches included. On a CPU they are not: at batch 1024 the epoch's
augmentation (about 0.45 ms a step on a 2-core Xeon) and the loss's
log-softmax over rows of 10 classes (about 0.2 ms; torch's CPU kernel takes
eight times as long for rows of 10 as for rows of 16) are compute. So the
loop runs a second time at ``--host-batch`` (8), where the compute is a few
µs, and the host time at batch 1024 is estimated as that step's, with its host
arrays replaced by batch 1024's: most of the host's work that grows with the
batch (the rest, concatenating each chunk's indices, is about 1.5 µs a step).

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
import torch
from torch import nn

import train
from cifar.build import build_loaders, make_accelerator, prepare_training
from cifar.checkpoint import Progress, Training
from cifar.config import TrainConfig, parse_config
from cifar.data import ImageArray, Splits
from cifar.loss import label_smoothed_cross_entropy
from cifar.optim import build_optimizer
from cifar.outputs import MetricsLog
from repro.fingerprint import environment_fingerprint
from repro.loader import GlobalBatchSampler
from repro.seeds import SeedPlan
from repro.stop import GracefulStop

NUM_CLASSES = 10
WHOLE_STEP, NEXT_BATCH, TRAINING_STEP = "whole step", "next batch", "training_step"
# The host arrays: the epoch's order (GlobalBatchSampler.epoch_order) and its samples' augmentation
# parameters (DeviceTrainBatches.params), which the host makes on any machine, growing with the epoch.
ORDER, PARAMS = "epoch order", "augmentation parameters"
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
        (GlobalBatchSampler, "epoch_order", ORDER),
        (type(train_batches), "params", PARAMS),
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
    parser.add_argument(
        "--batch-size", type=benchlib.positive_int, default=1024, help="global batch (the speedrun recipe's)"
    )
    parser.add_argument(
        "--host-batch",
        type=benchlib.positive_int,
        default=8,
        help="a batch at which a CPU's compute is negligible, for the host time on a CPU",
    )
    parser.add_argument("--steps", type=benchlib.positive_int, default=100, help="steps per epoch")
    parser.add_argument(
        "--repeats", type=benchlib.positive_int, default=5, help="epochs of the whole loop; each gives a figure"
    )
    parser.add_argument(
        "--side",
        type=benchlib.positive_int,
        default=3,
        help="image side in pixels: small makes compute negligible (reflect padding 2 needs 3)",
    )
    parser.add_argument("--threads", type=benchlib.positive_int, default=1, help="torch's intra-op threads")
    parser.add_argument("--determinism", default="strict", choices=["strict", "warn", "off"])
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "bf16", "fp16"],
        help="the config's by default (auto: bf16 on CUDA, fp32 on the CPU); bf16 on the CPU runs the step "
        "in autocast as on a GPU",
    )
    parser.add_argument(
        "--profile", type=benchlib.non_negative_int, default=0, metavar="N", help="also cProfile one epoch, top N"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.host_batch >= args.batch_size:
        parser.error(f"--host-batch must be smaller than --batch-size {args.batch_size}, got {args.host_batch}")
    return args


def host_time_estimate(small_batch: list[dict[str, float]], recipe_batch: list[dict[str, float]]) -> list[float]:
    """µs per step of host time at the recipe's batch, one figure per epoch of the small-batch run:
    its whole step, with its host arrays swapped for the median of the recipe batch's.

    At a small batch a CPU's compute is negligible: a step's time is the host's. What
    of the host's work grows with the batch is the epoch's arrays (the order, the
    augmentation parameters), which the recipe-batch run times where they are made.
    """
    arrays = median(host_arrays(epoch) for epoch in recipe_batch)
    return [epoch[WHOLE_STEP] - host_arrays(epoch) + arrays for epoch in small_batch]


def host_arrays(epoch: dict[str, float]) -> float:
    """µs per step making the epoch's order and augmentation parameters."""
    return epoch.get(ORDER, 0.0) + epoch.get(PARAMS, 0.0)


def main() -> None:
    args = parse_args()
    info = benchlib.start(args.determinism)
    torch.set_num_threads(args.threads)
    # On CUDA the trivial model's and the augmentation's kernels run on the GPU: the step's CPU
    # time is the host's. On a CPU they are compute, which the run at --host-batch leaves out.
    cuda = torch.cuda.is_available()
    batches = f"batch {args.batch_size}" + ("" if cuda else f" and {args.host_batch}")
    print(
        f"# {args.config}'s loop, {batches}, {args.steps} steps an epoch, {args.side}x{args.side} images, a one-layer "
        f"model, the device pipeline on {'cuda' if cuda else 'cpu'}, --determinism {args.determinism}, "
        f"{args.threads} torch threads, --mixed-precision {args.mixed_precision or 'of the config'}"
    )
    small_args = argparse.Namespace(**{**vars(args), "batch_size": args.host_batch})
    with tempfile.TemporaryDirectory(prefix="bench-host-") as scratch:
        epochs, wall, training = loop(args, Path(scratch) / "loop")
        small_epochs = [] if cuda else loop(small_args, Path(scratch) / "small-batch")[0]
        if args.profile:
            profile(args, Path(scratch), args.profile)
    config, device, precision = training.config, training.accelerator.device, training.accelerator.mixed_precision
    bare = bare_loop(args, config, device, precision)
    small_bare = [] if cuda else bare_loop(small_args, config, device, precision)
    for epoch in epochs + small_epochs:
        epoch[REST] = epoch[WHOLE_STEP] - sum(epoch.get(name, 0.0) for name in (NEXT_BATCH, TRAINING_STEP, *OPTIMIZER))

    def row(label: str, values: list[float]) -> list[str]:
        return [label, f"{median(values):.0f}", " ".join(f"{v:.0f}" for v in values) if len(values) > 1 else ""]

    def part(name: str, runs: list[dict[str, float]] = epochs) -> list[float]:
        return [epoch.get(name, 0.0) for epoch in runs]

    rows = [
        row("train.py's loop, whole step (CPU time)", part(WHOLE_STEP)),
        row("  the same, wall time (train.py's train_s)", wall),
        row("next batch (DeviceTrainBatches iteration)", part(NEXT_BATCH)),
        row("  of which the epoch's order (host arrays)", part(ORDER)),
        row("  of which its augmentation parameters (host arrays)", part(PARAMS)),
        row("training_step (forward, loss, backward)", part(TRAINING_STEP)),
        *(row(f"{name}()", part(name)) for name in OPTIMIZER),
        row("the rest: loss sum, stop check, lookahead, progress bar, bookkeeping", part(REST)),
        row("a bare hand-written loop's step, its batches made beforehand (CPU time)", bare),
    ]
    small_batch: dict[str, Any] = {}
    if cuda:
        host, bare_host, method = median(part(WHOLE_STEP)), median(bare), f"measured at batch {args.batch_size}"
    else:
        estimate = host_time_estimate(small_epochs, epochs)
        rows += [
            row(f"at batch {args.host_batch}: train.py's loop, whole step", part(WHOLE_STEP, small_epochs)),
            row(f"at batch {args.host_batch}: the bare loop's step", small_bare),
            row(f"train.py's host time at batch {args.batch_size}, estimated: the step at batch {args.host_batch}, "
                f"the host arrays at {args.batch_size}", estimate),
        ]  # fmt: skip
        host, bare_host = median(estimate), median(small_bare)
        method = f"estimated from batch {args.host_batch}; the bare loop at {args.host_batch}"
        small_batch = {
            "small_batch_us_per_step": small_epochs,
            "small_batch_bare_us_per_step": small_bare,
            "host_estimate_us_per_step": estimate,
        }
    print()
    benchlib.print_table(["per step", "µs (median)", "µs each epoch"], rows)
    if args.batch_size == 1024:
        print(f"\ntarget, at most 1000 µs of host time per step ({method}): {'met' if host <= 1000 else 'not met'}")
        print(f"train.py's loop / the bare loop, host time per step: {host / bare_host:.2f}")
    benchlib.write_json(
        args.json,
        {
            "environment": info,
            "settings": vars(args),
            "us_per_step": epochs,
            "wall_us_per_step": wall,
            "bare_us_per_step": bare,
            **small_batch,
            "host_us_per_step": host,
            "host_method": method,
        },
    )


if __name__ == "__main__":
    main()
