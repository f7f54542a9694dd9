"""Training throughput of train.py against a minimal hand-written PyTorch loop.

Both train the same model on the same images with the same augmentation
(random crop with 4 pixels of padding, horizontal flip, normalisation), batch
size, loss and optimizer (SGD with Nesterov momentum) for one epoch, then
evaluate the same test set, with the same number of threads and DataLoader
workers. The pipeline is train.py's ``main`` with command-line arguments, at
its defaults (strict determinism, per-sample augmentation seeding, its sampler,
checkpoints); its figure comes from its ``metrics.jsonl``: the epoch's
training images over ``train_s + eval_s``, the seconds from the start of the
epoch to the end of its evaluation. The hand-written loop is timed over the same span, with
torch's default settings (which train.py's strict mode changes, so they are put
back after each train.py run).

With ``--data-pipeline device`` train.py keeps the data on the device and
augments it in batches (cifar/device_data.py); the hand-written loop then does
what a fast hand-written loop does (airbench's way): the images in one tensor,
``torch.randperm`` for the order, and the same batched crop, flip and
normalisation with its offsets from ``torch.randint``.

Both run in this one process, alternating (ABBA order), so that the load of
other processes on a shared machine falls on both, and neither pays a process
start inside its figure; the figure is the median of the per-pair ratios.

    python bench/loop_vs_handwritten.py                          # small_cnn, batch 512, 5 pairs
    python bench/loop_vs_handwritten.py --data-pipeline device
    python bench/loop_vs_handwritten.py --model resnet9 --batch-size 64 --train-size 640 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import tempfile
import time
from pathlib import Path
from statistics import median

import benchlib
import torch
from torch import nn
from torch.utils.data import DataLoader

import train
from cifar.data import Transformed, synthetic, test_transform, train_transform
from cifar.device_data import CROP_PADDING, augment_batch, normalize
from cifar.models import build_model


def handwritten(args: argparse.Namespace) -> dict[str, float]:
    """One epoch and an evaluation, the way a short PyTorch tutorial writes them."""
    torch.manual_seed(args.seed)
    splits = synthetic(args.train_size, args.test_size)
    workers = {"num_workers": args.num_workers, "persistent_workers": args.num_workers > 0}
    train_loader = DataLoader(
        Transformed(splits.train, train_transform(splits, cutout=0)),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        **workers,
    )
    test_loader = DataLoader(Transformed(splits.test, test_transform(splits)), batch_size=args.batch_size, **workers)
    model = build_model(args.model, splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    start = time.perf_counter()
    model.train()
    steps = 0
    for images, labels in train_loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in test_loader:
            correct += int((model(images).argmax(1) == labels).sum())
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * args.batch_size / seconds, "test_accuracy": correct / len(splits.test)}


def handwritten_device(args: argparse.Namespace) -> dict[str, float]:
    """One epoch and an evaluation with the data in tensors and augmentation in batches."""
    torch.manual_seed(args.seed)
    splits = synthetic(args.train_size, args.test_size)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (splits.mean, splits.std))
    model = build_model(args.model, splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    start = time.perf_counter()
    model.train()
    order = torch.randperm(len(splits.train))
    steps = len(order) // args.batch_size
    for step in range(steps):
        indices = order[step * args.batch_size : (step + 1) * args.batch_size]
        crops = torch.randint(0, 2 * CROP_PADDING + 1, (len(indices), 2))
        params = torch.cat(
            [crops, torch.randint(0, 2, (len(indices), 1)), torch.zeros(len(indices), 2, dtype=torch.int64)], 1
        )
        images = augment_batch(splits.train.images[indices], params, mean, std, CROP_PADDING, cutout=0)
        loss = criterion(model(images), splits.train.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for begin in range(0, len(splits.test), args.batch_size):
            images = normalize(splits.test.images[begin : begin + args.batch_size], mean, std)
            correct += int((model(images).argmax(1) == splits.test.labels[begin : begin + args.batch_size]).sum())
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * args.batch_size / seconds, "test_accuracy": correct / len(splits.test)}


class TorchDefaults:
    """The process-wide settings train.py changes (determinism), captured now and put back by :meth:`restore`."""

    def __init__(self) -> None:
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        self.tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        self.matmul_precision = torch.get_float32_matmul_precision()

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = self.cudnn
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.tf32
        torch.set_float32_matmul_precision(self.matmul_precision)


def pipeline(args: argparse.Namespace, run_dir: Path, defaults: TorchDefaults) -> dict[str, float]:
    """Run train.py's main for one epoch and read its own throughput figure."""
    argv = [
        "--dataset", "synthetic",
        "--synthetic-train-size", str(args.train_size),
        "--synthetic-test-size", str(args.test_size),
        "--model", args.model,
        "--batch-size", str(args.batch_size),
        "--num-workers", str(args.num_workers),
        "--data-pipeline", args.data_pipeline,
        "--seed", str(args.seed),
        "--epochs", "1",
        "--determinism", args.determinism,
        "--output-dir", str(run_dir),
        "--overwrite",
    ]  # fmt: skip
    output = io.StringIO()  # its progress bar and summary lines
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            status = train.main(argv)
    finally:
        defaults.restore()
    if status != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} returned {status}:\n{output.getvalue()[-2000:]}")
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    images = record["images_per_s"] * record["train_s"]  # images_per_s counts training time only
    return {"images_per_s": images / (record["train_s"] + record["eval_s"]), "test_accuracy": record["test_accuracy"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet9", "resnet18"])
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=512, help="train.py's default")
    parser.add_argument(
        "--train-size", type=benchlib.positive_int, default=5120, help="synthetic training images: one epoch"
    )
    parser.add_argument(
        "--test-size", type=benchlib.positive_int, default=512, help="synthetic test images, evaluated once"
    )
    parser.add_argument(
        "--num-workers", type=benchlib.non_negative_int, default=2, help="DataLoader workers of both loops"
    )
    parser.add_argument("--data-pipeline", default="dataloader", choices=["dataloader", "device"])
    parser.add_argument("--determinism", default="strict", choices=["strict", "warn", "off"], help="train.py's only")
    parser.add_argument("--seed", type=int, default=2333)
    parser.add_argument("--repeats", type=benchlib.positive_int, default=5, help="pairs of runs")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    defaults = TorchDefaults()
    info = benchlib.environment()
    benchlib.print_environment(info)
    print(
        f"# {args.model}, batch {args.batch_size}, {args.train_size} synthetic training images (one epoch), "
        f"{args.test_size} test images, {args.data_pipeline} pipeline, {args.num_workers} workers, "
        f"train.py --determinism {args.determinism}"
    )
    runs: dict[str, list[dict[str, float]]] = {"train.py": [], "hand-written": []}
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch:
        sides = {
            "train.py": lambda: pipeline(args, Path(scratch) / "run", defaults),
            "hand-written": lambda: (handwritten_device if args.data_pipeline == "device" else handwritten)(args),
        }
        for warm_up in sides.values():  # not counted: first use of the allocator, thread pool, lazy imports
            warm_up()
        for repeat in range(args.repeats):
            for name in sides if repeat % 2 == 0 else reversed(sides):
                runs[name].append(sides[name]())
                gc.collect()  # shut the finished loaders' workers down before the next run
            print(
                f"pair {repeat + 1}/{args.repeats}: train.py {runs['train.py'][-1]['images_per_s']:.0f} img/s, "
                f"hand-written {runs['hand-written'][-1]['images_per_s']:.0f} img/s",
                flush=True,
            )
    ratios = [
        p["images_per_s"] / h["images_per_s"] for p, h in zip(runs["train.py"], runs["hand-written"], strict=True)
    ]
    ratio = median(ratios)
    print()
    benchlib.print_table(
        ["loop", "img/s (median)", "img/s each pair", "test acc (last)"],
        [
            [
                name,
                f"{median(r['images_per_s'] for r in results):.0f}",
                " ".join(f"{r['images_per_s']:.0f}" for r in results),
                f"{results[-1]['test_accuracy']:.3f}",
            ]
            for name, results in runs.items()
        ],
    )
    print(
        f"train.py / hand-written throughput: {ratio:.3f} (median of {args.repeats} pairs, "
        f"range {min(ratios):.3f}-{max(ratios):.3f}; target >= 0.95)"
    )
    benchlib.write_json(
        args.json, {"environment": info, "settings": vars(args), "runs": runs, "ratios": ratios, "ratio": ratio}
    )


if __name__ == "__main__":
    main()
