"""Where the GPU waits during train.py's steps: a torch.profiler timeline of its own loop.

train.py's loop (``train.train``) runs the recipe of ``--config`` (the speedrun
recipe's by default: its network, batch 1024, the device pipeline, bf16 on
CUDA, strict determinism) on synthetic 32x32 images for three epochs. The
first warms up cuDNN, the allocator and lazy state; the second runs
unprofiled, and its ``train_s`` over its steps is the loop's time per step
(the epoch's start, its augmentation of the epoch, included). The steps of
the third are profiled, from the request of its first batch to the start of
its evaluation, where the host waits for the queued steps to finish. Its
parts (the next batch, ``training_step``, the optimizer, scheduler and
lookahead steps, the stop check) are labelled in the timeline.

It prints, per step: the wall time; the time the GPU ran kernels, copies or
fills (their union); the rest, in which the GPU waited for the host; the
calls that made the host wait for the GPU inside the steps (a synchronize, a
blocking copy, a copy from pageable memory), which there should be none of;
the longest gaps in the GPU's work, with the parts of the step the host was
in meanwhile; and the host time of each part. Then the same network in a bare
hand-written loop over the same batches, made beforehand, profiled the same
way: the wall time and GPU busy time of a step with no host work but its own,
and train.py's step against it; the bare loop is also timed unprofiled, after
a warm-up pass, against train.py's unprofiled epoch, and so is the bare loop
with what the recipe adds to the step (its optimizer's parameter groups and
schedule, the lookahead): train.py against it is the loop's cost, it against
the bare loop the recipe's. ``--trace`` keeps train.py's timeline
(gzipped Chrome trace JSON: chrome://tracing or https://ui.perfetto.dev).

The profiler adds host time to each operation it records, in both loops: the
GPU's share of the steps is a lower bound. Unprofiled, the two loops' ratio is
what the GPU check's stage f compares with a bare step in another process.

On a machine without CUDA it profiles the host alone: no GPU figures.

    python bench/step_timeline.py
    python bench/step_timeline.py --steps 24 --trace /tmp/steps.json.gz
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gzip
import io
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import benchlib
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import train
from cifar.checkpoint import Progress, Training
from cifar.lookahead import Lookahead
from cifar.loss import label_smoothed_cross_entropy
from cifar.optim import build_optimizer
from cifar.outputs import MetricsLog
from repro.stop import GracefulStop

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# CUDA runtime calls that return only when the GPU has done its queued work.
WAITING_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
STEP_PREFIX = "train.py step "
NEXT_BATCH = "next batch"
LONGEST_GAPS = 5
Batch = tuple[torch.Tensor, torch.Tensor]


def label(name: str, function: Callable) -> Callable:
    """``function``, its calls marked ``name`` in the timeline."""

    @functools.wraps(function)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return function(*args, **kwargs)

    return labelled


class ProfiledLastEpoch:
    """Training batches whose last epoch runs under ``profiler``, started when the epoch's
    first batch is requested; each step, from one batch request to the next, is marked
    ``STEP_PREFIX`` and its number in the timeline. :meth:`stop` ends the window."""

    def __init__(self, batches: train.Batches, profiler: profile, epochs: int, on_cuda: bool) -> None:
        self.batches = batches
        self.profiler = profiler
        self.epochs_left = epochs
        self.on_cuda = on_cuda
        self.profiling = False
        self.steps = 0
        self.step_mark: record_function | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epochs_left -= 1
        if self.epochs_left == 0:
            self.synchronize()  # the window opens on an idle GPU
            self.profiler.start()
            self.profiling = True
        iterator = iter(self.batches)
        while True:
            if self.profiling:
                self.end_step()
                self.steps += 1
                self.step_mark = record_function(f"{STEP_PREFIX}{self.steps}")
                self.step_mark.__enter__()
            with record_function(NEXT_BATCH) if self.profiling else contextlib.nullcontext():
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch

    def end_step(self) -> None:
        if self.step_mark is not None:
            self.step_mark.__exit__(None, None, None)
            self.step_mark = None

    def stop(self) -> None:
        """End the last step, and the window once the GPU has run what the steps queued."""
        if self.profiling:
            self.end_step()
            self.synchronize()
            self.profiler.stop()
            self.profiling = False

    def synchronize(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()


def profile_steps(training: Training, train_batches: train.Batches, test_batches: train.Batches) -> dict[str, Any]:
    """Run train.py's loop for the config's epochs, profiling the steps of the last; returns the trace."""
    on_cuda = training.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    profiler = profile(activities=activities)
    batches = ProfiledLastEpoch(train_batches, profiler, training.config.epochs, on_cuda)
    # train.py calls torch's optimizer itself when there is no gradient scaler; the
    # scheduler's step is labelled on its class, where its checkpointed state does not see it.
    optimizer = training.optimizer if training.accelerator.scaler is not None else training.optimizer.optimizer
    finish_epoch = train.finish_epoch

    def stop_then_finish_epoch(*args: Any, **kwargs: Any) -> dict[str, float]:
        batches.stop()
        return finish_epoch(*args, **kwargs)

    labelled = [
        (train, "training_step", "training_step"),
        (optimizer, "step", "optimizer.step"),
        (type(training.scheduler), "step", "scheduler.step"),
        (optimizer, "zero_grad", "optimizer.zero_grad"),
        (GracefulStop, "agreed", "stop.agreed"),
    ]
    if training.lookahead is not None:
        labelled.append((training.lookahead, "after_step", "lookahead.after_step"))
    metrics = MetricsLog(training.run_dir / "metrics.jsonl")
    loss_sum = torch.zeros((), device=training.accelerator.device)
    with contextlib.ExitStack() as undo:
        for owner, name, part in labelled:
            original = getattr(owner, name)
            setattr(owner, name, label(part, original))
            undo.callback(setattr, owner, name, original)
        train.finish_epoch = stop_then_finish_epoch
        undo.callback(setattr, train, "finish_epoch", finish_epoch)
        stop = undo.enter_context(GracefulStop())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.train(training, batches, test_batches, metrics, Progress(), loss_sum, None, stop)
    return exported(profiler)


def bare_step(training: Training, steps: int, *, recipe: bool) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """One step of a bare hand-written loop over the network train.py trained: forward in the
    run's autocast, loss, backward, an SGD step, ``zero_grad``; with ``recipe``, what the recipe
    adds to it: the optimizer's parameter groups and schedule (``build_optimizer``) and the
    lookahead. Call it with the step's number (from 1) and batch, ``steps`` steps a pass.

    Both learn at a small rate: the network keeps training, and must not diverge into values
    whose arithmetic is slower (NaNs, denormals) and would skew the time."""
    config = training.config
    model = training.accelerator.unwrap_model(training.model)
    scheduler, lookahead = None, None
    if recipe:
        optimizer, scheduler = build_optimizer(replace(config, lr=1e-4), model, steps)
        if config.lookahead_every:
            lookahead = Lookahead(model, config.lookahead_every, 2 * steps)  # its final update is not timed
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.85, nesterov=True, weight_decay=5e-4)

    def step(number: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        with training.accelerator.autocast():
            loss = label_smoothed_cross_entropy(model(images), labels, config.label_smoothing)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if lookahead is not None:
            lookahead.after_step(number)

    return step


def timed_pass(training: Training, batches: list[Batch], step: Callable, *, profiled: bool = False) -> float:
    """Wall µs per step of one pass of ``step`` over ``batches``, the device synchronised around
    it; ``profiled`` marks each step as train.py's are marked."""
    synchronize = torch.cuda.synchronize if training.accelerator.device.type == "cuda" else lambda: None
    synchronize()
    started = time.perf_counter()
    for number, (images, labels) in enumerate(batches, start=1):
        with record_function(f"{STEP_PREFIX}{number}") if profiled else contextlib.nullcontext():
            step(number, images, labels)
    synchronize()
    return (time.perf_counter() - started) * 1e6 / len(batches)


def profile_bare_steps(training: Training, batches: list[Batch]) -> tuple[dict[str, Any], float]:
    """The bare loop (:func:`bare_step`) over one epoch of the device pipeline's ``batches``,
    made beforehand. One pass warms up, the next is timed unprofiled, the last is profiled:
    the timeline of a loop with no host work but the step's own. Returns the trace and the
    timed pass's wall µs per step."""
    step = bare_step(training, len(batches), recipe=False)
    timed_pass(training, batches, step)
    unprofiled_us = timed_pass(training, batches, step)
    on_cuda = training.accelerator.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]) as profiler:
        timed_pass(training, batches, step, profiled=True)
    return exported(profiler), unprofiled_us


def time_recipe_steps(training: Training, batches: list[Batch]) -> float:
    """The bare loop with the recipe's additions (:func:`bare_step`): between the bare loop and
    train.py's, it tells the recipe's cost from the loop's. One pass warms up, the next is
    timed, unprofiled; returns its wall µs per step."""
    step = bare_step(training, len(batches), recipe=True)
    timed_pass(training, batches, step)
    return timed_pass(training, batches, step)


def exported(profiler: profile) -> dict[str, Any]:
    """The profiler's timeline, as the Chrome trace JSON it exports."""
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as scratch:
        path = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    union: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def analyse(trace: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """Per-step figures of a Chrome trace of profiler steps (times in µs, as the trace's).

    The window runs from the start of the first profiler step to the end of the
    last event. ``parts``: the labels whose host time is summed and whose overlap
    with each of the GPU's longest gaps is reported.
    """
    events = [event for event in trace["traceEvents"] if event.get("ph") == "X" and "dur" in event]
    # The host's labels; on CUDA the timeline repeats them on the GPU's rows as gpu_user_annotation.
    host_labels = [event for event in events if event.get("cat") == "user_annotation"]
    steps = [event for event in host_labels if event["name"].startswith(STEP_PREFIX)]
    if not steps:
        raise ValueError("the trace holds no profiler step")
    window = (min(event["ts"] for event in steps), max(event["ts"] + event["dur"] for event in events))
    wall = window[1] - window[0]
    device = [(event["ts"], event["ts"] + event["dur"]) for event in events if event.get("cat") in DEVICE_CATEGORIES]
    busy = merged([(max(start, window[0]), end) for start, end in device if end > window[0]])
    labelled = [(event["name"], (event["ts"], event["ts"] + event["dur"])) for event in host_labels]
    labelled = [(name, span) for name, span in labelled if name in parts]
    step_spans = [(event["ts"], event["ts"] + event["dur"]) for event in steps]
    waiting = collections.Counter(
        event["name"]
        for event in events
        if event.get("cat") == "cuda_runtime"
        and event["name"] in WAITING_CALLS
        and any(start <= event["ts"] < end for start, end in step_spans)
    )
    pageable = sum(1 for event in events if event.get("cat") == "gpu_memcpy" and "Pageable" in event["name"])
    figures: dict[str, Any] = {
        "steps": len(steps),
        "wall_us_per_step": wall / len(steps),
        "host_us_per_step": {
            name: sum(end - start for part, (start, end) in labelled if part == name) / len(steps) for name in parts
        },
        "gpu_activity_recorded": bool(device),
        "waiting_calls": dict(waiting),  # inside the steps: the window's closing synchronize comes after them
        "pageable_copies": pageable,
    }
    if not device:
        return figures
    gaps = [(window[0], busy[0][0])] + [(a[1], b[0]) for a, b in itertools.pairwise(busy)]
    gaps = [gap for gap in gaps if gap[1] > gap[0]]
    step_starts = sorted(start for start, _ in step_spans)
    longest = []
    for gap in sorted(gaps, key=lambda gap: gap[0] - gap[1])[:LONGEST_GAPS]:
        during = collections.Counter()
        for name, span in labelled:
            during[name] += overlap(gap, span)
        longest.append(
            {
                "us": gap[1] - gap[0],
                "step": sum(1 for start in step_starts if start <= gap[0]),
                "during_us": {name: time for name, time in during.most_common() if time > 0},
            }
        )
    busy_us = sum(end - start for start, end in busy)
    figures.update(
        gpu_busy_us_per_step=busy_us / len(steps),
        gpu_busy_fraction=busy_us / wall,
        longest_gaps=longest,
    )
    return figures


def report(figures: dict[str, Any], bare: dict[str, Any]) -> None:
    steps = figures["steps"]
    print(f"\ntrain.py's loop, {steps} steps profiled; per step: wall {figures['wall_us_per_step']:.0f} µs", end="")
    if figures["gpu_activity_recorded"]:
        waited = figures["wall_us_per_step"] - figures["gpu_busy_us_per_step"]
        print(
            f", GPU busy {figures['gpu_busy_us_per_step']:.0f} µs ({figures['gpu_busy_fraction']:.1%}), "
            f"GPU waiting for the host {waited:.0f} µs"
        )
    else:
        print("; no GPU activity recorded (no CUDA): the host's figures only")
    calls = figures["waiting_calls"]
    print(f"calls inside the steps that waited for the GPU: {calls or 'none'}")
    print(f"copies from pageable memory: {figures['pageable_copies']}")
    for gap in figures.get("longest_gaps", []):
        during = ", ".join(f"{name} {time:.0f}" for name, time in gap["during_us"].items()) or "no labelled part"
        print(f"GPU idle {gap['us']:.0f} µs in step {gap['step']}; the host meanwhile in (µs): {during}")
    print()
    rows = [[name, f"{time:.0f}"] for name, time in figures["host_us_per_step"].items()]
    benchlib.print_table(["part of the step", "host µs per step"], rows)
    print(f"\nthe bare loop, {bare['steps']} steps; per step: wall {bare['wall_us_per_step']:.0f} µs", end="")
    if bare["gpu_activity_recorded"]:
        print(f", GPU busy {bare['gpu_busy_us_per_step']:.0f} µs ({bare['gpu_busy_fraction']:.1%})", end="")
    print(f"; train.py's step / the bare step, wall: {figures['wall_us_per_step'] / bare['wall_us_per_step']:.2f}")
    unprofiled, bare_unprofiled = figures["unprofiled_us_per_step"], bare["unprofiled_us_per_step"]
    recipe = bare["recipe_unprofiled_us_per_step"]
    print(
        f"unprofiled: train.py's second epoch {unprofiled:.0f} µs a step (its train_s, the epoch's start included), "
        f"the bare loop {bare_unprofiled:.0f}; train.py / bare: {unprofiled / bare_unprofiled:.2f}\n"
        f"the bare loop with the recipe's parameter groups, schedule and lookahead {recipe:.0f} µs a step: "
        f"train.py / it {unprofiled / recipe:.2f} (the loop's cost), it / the bare loop "
        f"{recipe / bare_unprofiled:.2f} (the recipe's)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(benchlib.SPEEDRUN_CONFIG), help="the recipe whose loop is profiled")
    parser.add_argument(
        "--batch-size", type=benchlib.positive_int, default=1024, help="global batch (the speedrun recipe's)"
    )
    parser.add_argument(
        "--steps", type=benchlib.positive_int, default=12, help="steps per epoch; the third epoch's are profiled"
    )
    parser.add_argument("--determinism", default="strict", choices=["strict", "warn", "off"])
    parser.add_argument("--trace", help="also write the timeline here, gzipped Chrome trace JSON")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = benchlib.start(args.determinism)
    arguments = [
        *("--config", args.config, "--dataset", "synthetic", "--data-pipeline", "device"),
        *("--synthetic-train-size", str(args.steps * args.batch_size), "--synthetic-test-size", "1024"),
        *("--batch-size", str(args.batch_size), "--epochs", "3", "--determinism", args.determinism),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-timeline-") as scratch:
        training, train_batches, test_batches = benchlib.train_py_objects(arguments, Path(scratch) / "run")
        trace = profile_steps(training, train_batches, test_batches)
        unprofiled = json.loads((training.run_dir / "metrics.jsonl").read_text().splitlines()[1])
        batches = list(train_batches)
        bare_trace, bare_unprofiled_us = profile_bare_steps(training, batches)
        recipe_unprofiled_us = time_recipe_steps(training, batches)
    config, device = training.config, training.accelerator.device
    print(
        f"# {args.config}, model {config.model}, batch {config.batch_size}, {len(training.sampler)} steps an epoch, "
        f"on {device}, {training.accelerator.mixed_precision}, --determinism {args.determinism}"
    )
    parts = [NEXT_BATCH, "training_step", "optimizer.step", "scheduler.step", "optimizer.zero_grad", "stop.agreed"]
    if training.lookahead is not None:
        parts.append("lookahead.after_step")
    figures, bare = analyse(trace, parts), analyse(bare_trace, [])
    figures["unprofiled_us_per_step"] = unprofiled["train_s"] * 1e6 / len(training.sampler)
    bare["unprofiled_us_per_step"] = bare_unprofiled_us
    bare["recipe_unprofiled_us_per_step"] = recipe_unprofiled_us
    report(figures, bare)
    if args.trace:
        with gzip.open(args.trace, "wt") as file:
            json.dump(trace, file)
        print(f"train.py's timeline written to {args.trace}")
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), **figures, "bare": bare})


if __name__ == "__main__":
    main()
