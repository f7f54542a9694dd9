"""The fast config (ResNet-9) on real CIFAR-10 images, for a small fixed budget on a CPU.

The CIFAR-10 JPEGs (``tar -xJf cifar10-jpeg.tar.xz -C /tmp/cifar10-jpeg``, a
``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` folder) are too many for a
CPU to train on in minutes, so this takes the first ``--train-per-class`` and
``--test-per-class`` images of each class (sorted by name) into a folder of
symbolic links, and trains train.py on it with ``configs/cifar10_fast.yaml``
for ``--epochs`` epochs. The recipe is kept in shape: the warm-up covers the
same fraction of the run as in the config, and the learning rate scales with
the batch size (linear scaling), as the config's comments say. It prints the
test accuracy reached, train.py's images/s and the wall time.

    python bench/real_images.py --data-dir /tmp/cifar10-jpeg
    python bench/real_images.py --data-dir /tmp/cifar10-jpeg --train-per-class 5000 --test-per-class 1000 \\
        --epochs 24 --batch-size 512     # the whole set and the whole recipe (a GPU's work)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import benchlib

from cifar.config import load_yaml

CONFIG = benchlib.REPO / "configs" / "cifar10_fast.yaml"


def make_subset(source: Path, target: Path, per_class: dict[str, int]) -> dict[str, int]:
    """Link the first ``per_class[split]`` images of each class of ``source`` into
    ``target``; return the number of images linked per split."""
    linked = dict.fromkeys(per_class, 0)
    for split, count in per_class.items():
        classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
        if not classes:
            sys.exit(f"{source / split} has no class folders: unpack cifar10-jpeg.tar.xz there first")
        for class_dir in classes:
            (target / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / split / class_dir.name / image.name).symlink_to(image)
                linked[split] += 1
    return linked


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="the unpacked CIFAR-10 JPEG folder")
    parser.add_argument("--train-per-class", type=benchlib.positive_int, default=200)
    parser.add_argument("--test-per-class", type=benchlib.positive_int, default=50)
    parser.add_argument("--epochs", type=benchlib.positive_int, default=2)
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=128)
    parser.add_argument(
        "--num-workers", type=benchlib.non_negative_int, default=0, help="on 2 cores, workers compete with training"
    )
    parser.add_argument("--mixed-precision", default="no", help="bf16 autocast is slow on CPUs without bf16 units")
    parser.add_argument("--output-dir", type=Path, help="keep train.py's run folder here (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = benchlib.environment()
    benchlib.print_environment(info)
    recipe = load_yaml(CONFIG)
    lr = recipe["lr"] * args.batch_size / recipe["batch_size"]
    warmup = recipe["warmup_epochs"] * args.epochs / recipe["epochs"]
    with tempfile.TemporaryDirectory(prefix="bench-real-") as scratch:
        subset = Path(scratch) / "images"
        linked = make_subset(args.data_dir, subset, {"train": args.train_per_class, "test": args.test_per_class})
        run_dir = args.output_dir or Path(scratch) / "run"
        command = [
            sys.executable, str(benchlib.REPO / "train.py"),
            "--config", str(CONFIG),
            "--dataset", "imagefolder",
            "--data-dir", str(subset),
            "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size),
            "--lr", f"{lr:g}",
            "--warmup-epochs", f"{warmup:g}",
            "--num-workers", str(args.num_workers),
            "--mixed-precision", args.mixed_precision,
            "--output-dir", str(run_dir),
            "--overwrite",
        ]  # fmt: skip
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        benchlib.run_process(command, cwd=benchlib.REPO)
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [
        [r["epoch"], r["step"], f"{r['train_loss']:.3f}", f"{r['test_accuracy']:.2%}", f"{r['images_per_s']:.1f}"]
        for r in records
    ]
    benchlib.print_table(["epoch", "step", "train loss", "test acc", "img/s"], rows)
    print(
        f"{linked['train']} training and {linked['test']} test images, {args.epochs} epochs: "
        f"test accuracy {manifest['test_accuracy']:.2%}, wall time {wall:.0f} s (train.py start to exit)"
    )
    benchlib.write_json(
        args.json,
        {"environment": info, "settings": {k: str(v) for k, v in vars(args).items()}, "records": records,
         "test_accuracy": manifest["test_accuracy"], "weights_sha256": manifest["weights_sha256"], "wall_s": wall},
    )  # fmt: skip


if __name__ == "__main__":
    main()
