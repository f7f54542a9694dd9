"""Tensor operations per training step: train.py's loop against a bare hand-written step.

On a GPU each tensor operation is at least one kernel launch, a few µs of host
time: an operation train.py adds to every step is host time the GPU may wait
for. This counts them, device-independently, with a dispatch mode: over the
steps of one epoch of train.py's own loop (``train.train``: the device
pipeline's batches, ``training_step``, the optimizer, scheduler and lookahead,
the loss sum; the epoch's evaluation and checkpoint left out), and over a bare
step of the same network: forward, cross-entropy, backward, an SGD step with
Nesterov momentum and weight decay, ``zero_grad``. Its operations by name show
what train.py's step adds (the recipe's label smoothing and parameter groups,
the bookkeeping) and what the bare step lacks. The speedrun net's step is
counted twice: in an epoch in which its whitening bias trains (the recipe's
first three) and in one after (the other seven), where that bias has no
gradient.

Small synthetic images at a small batch: the count does not depend on the
batch size or on the device's speed. Both optimizers run foreach operations, as
torch's SGD does on CUDA: train.py's (cifar/sgd.py) on every device, the bare
step's torch SGD told to (on the CPU it would take one parameter at a time), so
that the counts are about the kernels a GPU launches.

    python bench/step_operations.py
    python bench/step_operations.py --config configs/cifar10_fast.yaml
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import benchlib
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import train
from cifar.checkpoint import Progress, Training
from cifar.outputs import MetricsLog
from repro.determinism import configure_determinism
from repro.stop import GracefulStop


class OperationCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched, by name, while ``counting`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.operations: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counting:
            self.operations[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def build(args: argparse.Namespace, run_dir: Path) -> tuple[Training, train.Batches, train.Batches]:
    """train.py's training objects for ``--config``, built as its ``main`` builds them, on synthetic data."""
    arguments = [
        *("--config", args.config, "--dataset", "synthetic", "--data-pipeline", "device"),
        *("--synthetic-train-size", str(args.steps * args.batch_size), "--batch-size", str(args.batch_size)),
        # Epoch 2 counted with the whitening bias training, epoch 3 without (the recipe's last 7 of 10).
        *("--epochs", "3", "--whiten-bias-epochs", "2"),
    ]
    return benchlib.train_py_objects(arguments, run_dir)


def train_py_operations(
    training: Training, train_batches: train.Batches, test_batches: train.Batches
) -> tuple[dict[str, float], dict[str, float]]:
    """Operations per step over train.py's second and third epochs (the first warms up lazy
    state), their ends left out."""
    counter = OperationCounter()
    finish_epoch = train.finish_epoch
    counts = []

    def counted_finish_epoch(*args: Any, **kwargs: Any) -> dict[str, float]:
        counts.append(counter.operations.copy())
        counter.counting = False
        try:
            return finish_epoch(*args, **kwargs)
        finally:
            counter.operations.clear()
            counter.counting = True

    metrics = MetricsLog(training.run_dir / "metrics.jsonl")
    loss_sum = torch.zeros((), device=training.accelerator.device)
    train.finish_epoch = counted_finish_epoch
    try:
        with (
            counter,
            GracefulStop() as stop,
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            train.train(training, train_batches, test_batches, metrics, Progress(), loss_sum, None, stop)
    finally:
        train.finish_epoch = finish_epoch
    steps = len(training.sampler)
    second, third = ({name: count / steps for name, count in epoch.items()} for epoch in counts[1:3])
    return second, third


def bare_operations(training: Training, train_batches: train.Batches) -> dict:
    """Operations of one bare step of the same network, as train.py left it (after one uncounted step)."""
    model = training.accelerator.unwrap_model(training.model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.85, nesterov=True, weight_decay=5e-4, foreach=True
    )
    criterion = nn.CrossEntropyLoss()
    images, labels = next(iter(train_batches))
    counter = OperationCounter()
    for step in range(2):
        counter.counting = step == 1
        with counter, training.accelerator.autocast():
            loss = criterion(model(images), labels)
        with counter:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return dict(counter.operations)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(benchlib.SPEEDRUN_CONFIG), help="the recipe whose loop is counted")
    parser.add_argument(
        "--batch-size", type=benchlib.positive_int, default=32, help="global batch; the count does not depend on it"
    )
    parser.add_argument("--steps", type=benchlib.positive_int, default=10, help="steps per epoch")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = benchlib.environment()
    benchlib.print_environment(info)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as scratch:
        training, train_batches, test_batches = build(args, Path(scratch) / "run")
        configure_determinism(training.config.determinism)
        loop, later = train_py_operations(training, train_batches, test_batches)
        bare = bare_operations(training, train_batches)
    device = training.accelerator.device.type
    print(f"# {args.config}, model {training.config.model}, on {device}, batch {args.batch_size}")
    names = sorted({*loop, *later, *bare}, key=lambda name: -(loop.get(name, 0) - bare.get(name, 0)))
    rows = [[name, *(f"{counts.get(name, 0):.1f}" for counts in (loop, later, bare))] for name in names]
    rows = [row for row in rows if len(set(row[1:])) > 1]
    print()
    header = ["operation (per step)", "train.py", "train.py, whitening bias done", "bare step"]
    benchlib.print_table(header, rows)
    loop_total, later_total, bare_total = sum(loop.values()), sum(later.values()), sum(bare.values())
    # The bare step runs on the network as train.py leaves it: a speedrun net's whitening bias done.
    print(
        f"\nper step: train.py {loop_total:.1f} operations ({later_total:.1f} once the whitening bias is done), "
        f"the bare step {bare_total}; ratio, like for like: {later_total / bare_total:.2f}"
    )
    figures = {"train_py": loop, "train_py_whitening_bias_done": later, "bare": bare}
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), **figures})


if __name__ == "__main__":
    main()
