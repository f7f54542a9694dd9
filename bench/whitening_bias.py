"""The speedrun net's training step with and without its whitening bias's gradient.

The speedrun recipe trains the whitening layer's bias for its first
``whiten_bias_epochs`` (3 of 10); train.py then switches that gradient off
(cifar/optim.py: ``set_whitening_bias_training``), which spares the backward
operations at full image size that only the bias needed: the gradient of the
second convolution's input, GELU's, and the bias's sum over every pixel. This
times a bare training step (forward, label-smoothed loss, backward, the
recipe's SGD) of the network both ways, alternating (ABBAAB...), on random
images: on CUDA in bf16 autocast and channels_last, synchronised around each
timed block; on the CPU in float32, the thread's CPU time.

    python bench/whitening_bias.py                      # CPU: batch 128
    python bench/whitening_bias.py --batch-size 1024 --steps 40   # as stage f runs it on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import time
from statistics import median

import benchlib
import torch

from cifar.config import TrainConfig, parse_config
from cifar.loss import label_smoothed_cross_entropy
from cifar.models import SpeedrunNet
from cifar.optim import build_optimizer


def step_seconds(
    args: argparse.Namespace,
    device: torch.device,
    model: SpeedrunNet,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
) -> float:
    """Seconds per step over ``--steps`` steps of ``model`` as its whitening bias's gradient is set now."""
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    labels = torch.randint(0, 10, (args.batch_size,), device=device, generator=generator)
    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    clock = time.perf_counter if on_cuda else time.thread_time
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if on_cuda:
                torch.cuda.synchronize(device)
            started = clock()
        with autocast:
            loss = label_smoothed_cross_entropy(model(images), labels, config.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if on_cuda:
        torch.cuda.synchronize(device)
    return (clock() - started) / args.steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=128, help="images per step")
    parser.add_argument("--steps", type=benchlib.positive_int, default=5, help="timed steps per measurement")
    parser.add_argument(
        "--warmup", type=benchlib.non_negative_int, default=2, help="untimed steps before each measurement"
    )
    parser.add_argument("--rounds", type=benchlib.positive_int, default=2, help="rounds of (on, off, off, on)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    info = benchlib.start("strict")
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SpeedrunNet().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Built with the bias trainable, as train.py builds it: the bias stays in its group when switched off.
    config = parse_config(["--config", str(benchlib.SPEEDRUN_CONFIG)])
    optimizer, _ = build_optimizer(config, model, args.steps)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for bias_trains in (True, False, False, True):
            model.whiten.bias.requires_grad_(bias_trains)
            seconds[bias_trains].append(step_seconds(args, device, model, optimizer, config))
    on, off = median(seconds[True]), median(seconds[False])
    print(f"# the speedrun net on {device.type}, batch {args.batch_size}, {args.steps} steps a measurement")
    for label, bias_trains in (("with the whitening bias's gradient", True), ("without it", False)):
        each = ", ".join(f"{s * 1e3:.2f}" for s in seconds[bias_trains])
        print(f"{label:<36} {median(seconds[bias_trains]) * 1e3:.2f} ms a step (each: {each})")
    print(f"without / with: {off / on:.3f}")
    figures = {"with_s": seconds[True], "without_s": seconds[False], "without_over_with": off / on}
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), **figures})


if __name__ == "__main__":
    main()
