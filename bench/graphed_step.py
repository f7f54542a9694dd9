"""The speedrun net's training step with its forward and backward replayed as CUDA graphs, against the same step eager.

If the host's time bounds train.py's step on a GPU (stage g of the GPU check
says whether), the kernel launches are the lever: a CUDA graph replays a
captured sequence of kernels with one launch. ``torch.cuda.make_graphed_callables``
captures a module's forward and its backward; here the module is the speedrun
net with its label-smoothed loss, in bf16 autocast as train.py runs it, and the
optimizer (the recipe's parameter groups and schedule) and the lookahead stay
eager. Replaying the kernels the eager step launches, in the same order, should
give the same bits; this measures whether it does and what the graphs save,
before train.py would use them.

Two copies of the net from one initialisation train side by side on the same
batches (random images, channels_last, strict mode), one eager and one graphed,
each with its own optimizer, schedule and lookahead, at a small rate (random
labels) and with a lookahead whose end lies past the passes (its updates
change the weights, its hand-over never comes): a warm-up pass, then
``--repeats`` rounds of one pass of ``--steps`` steps each, alternating; the
figure is each pass's wall µs per step, the device synchronised around it.
At the recipe's batch that is the step's time, which the GPU's work may bound
whatever the host saves; at a small batch (``--batch-size 32``: the GPU's work
a fraction of the host's) it is the host's time, and the ratio is what the
graphs save the host. Capturing runs the module's forward and backward a few
times (its warm-up), which moves the BatchNorm statistics: the graphed copy's
are put back after. At the end the two copies' parameters, buffers and
momentum buffers are compared bit for bit (NaNs included).

The whitening bias keeps its gradient throughout: the step is that of the
recipe's first epochs. A train.py that used graphs would capture again when
it switches that gradient off.

CUDA only (CUDA graphs): elsewhere it says so and writes ``"cuda": false``.

    python bench/graphed_step.py
    python bench/graphed_step.py --batch-size 32 --steps 24
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from statistics import median
from typing import Any

import benchlib
import torch
from torch import nn

from cifar.config import TrainConfig, parse_config
from cifar.lookahead import Lookahead
from cifar.loss import label_smoothed_cross_entropy
from cifar.models import build_model
from cifar.optim import build_optimizer

NUM_CLASSES = 10
Batch = tuple[torch.Tensor, torch.Tensor]


class StepLoss(nn.Module):
    """The model's label-smoothed loss on a batch, computed as train.py's step computes it, in
    bf16 autocast; without autocast's cache of cast weights, which graph capture refuses
    (the casts themselves are the same)."""

    def __init__(self, model: nn.Module, smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.smoothing = smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return label_smoothed_cross_entropy(self.model(images), labels, self.smoothing)


class Trainer:
    """One copy of the net with the recipe's optimizer, schedule and lookahead, and its step count."""

    def __init__(self, model: nn.Module, config: TrainConfig, steps_per_epoch: int, total_steps: int) -> None:
        self.model = model
        self.step_loss = StepLoss(model, config.label_smoothing)
        # A small rate: random labels must not drive the weights into slower arithmetic (NaNs).
        self.optimizer, self.scheduler = build_optimizer(replace(config, lr=1e-4), model, steps_per_epoch)
        # total_steps lies past the bench's passes: its decay rises over them, so its updates change
        # the weights, and its hand-over never comes.
        self.lookahead = Lookahead(model, config.lookahead_every, total_steps)
        self.steps = 0

    def graph(self, sample: Batch) -> None:
        """Replace the loss's forward and backward by CUDA graphs, captured on a copy of ``sample``."""
        buffers = {name: tensor.clone() for name, tensor in self.model.named_buffers()}
        # The sample's tensors become the graphs' inputs, into which every later batch is copied:
        # a copy, so that the batches themselves are never overwritten.
        static = tuple(tensor.clone() for tensor in sample)
        self.step_loss = torch.cuda.make_graphed_callables(self.step_loss, static)
        with torch.no_grad():
            for name, tensor in self.model.named_buffers():
                tensor.copy_(buffers[name])

    def timed_pass(self, batches: list[Batch]) -> float:
        """Wall µs per step of one pass over ``batches``, a CUDA device synchronised around it."""
        synchronize = torch.cuda.synchronize if batches[0][0].is_cuda else lambda: None
        synchronize()
        started = time.perf_counter()
        for images, labels in batches:
            self.step_loss(images, labels).backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
            self.lookahead.after_step(self.steps)
        synchronize()
        return (time.perf_counter() - started) * 1e6 / len(batches)

    def same_bits(self, other: Trainer) -> bool:
        """Whether the two copies' parameters, buffers and momentum buffers are equal bit for bit."""
        mine, theirs = self.state(), other.state()
        return len(mine) == len(theirs) and all(map(benchlib.bitwise_equal, mine, theirs))

    def state(self) -> list[torch.Tensor]:
        """Parameters, buffers and momentum buffers, in a fixed order."""
        momentum = [
            self.optimizer.state[param]["momentum_buffer"]
            for group in self.optimizer.param_groups
            for param in group["params"]
            if param in self.optimizer.state
        ]
        return [*self.model.state_dict().values(), *momentum]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=benchlib.positive_int, default=1024, help="the speedrun recipe's")
    parser.add_argument("--steps", type=benchlib.positive_int, default=12, help="steps per pass")
    parser.add_argument("--repeats", type=benchlib.positive_int, default=5, help="timed passes of each")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    info = benchlib.start("strict")
    if not torch.cuda.is_available():
        print("CUDA graphs need CUDA: nothing measured")
        benchlib.write_json(args.json, {"environment": info, "settings": vars(args), "cuda": False})
        return
    device = torch.device("cuda")
    config = parse_config(["--config", str(benchlib.SPEEDRUN_CONFIG), "--dataset", "synthetic"])
    torch.manual_seed(0)
    images = torch.randn(args.steps * args.batch_size, 3, 32, 32, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (len(images),), device=device)
    batches = list(zip(images.split(args.batch_size), labels.split(args.batch_size), strict=True))
    model = build_model(config.model, NUM_CLASSES).to(device, memory_format=torch.channels_last)
    total_steps = 2 * (args.repeats + 1) * args.steps  # twice the passes' steps
    eager = Trainer(model, config, args.steps, total_steps)
    graphed = Trainer(copy.deepcopy(model), config, args.steps, total_steps)
    started = time.perf_counter()
    graphed.graph(batches[0])
    capture_s = time.perf_counter() - started
    for trainer in (eager, graphed):  # a warm-up pass each: cuDNN, the allocator
        trainer.timed_pass(batches)
    figures = benchlib.alternate(
        {"eager": lambda: eager.timed_pass(batches), "graphed": lambda: graphed.timed_pass(batches)}, args.repeats
    )
    results = summary(figures, capture_s, eager.steps, eager.same_bits(graphed))
    print(
        f"# speedrun net, batch {args.batch_size}, bf16, strict, channels_last; {args.repeats} alternating "
        f"passes of {args.steps} steps each after a warm-up; capture took {capture_s:.2f} s"
    )
    benchlib.print_table(
        ["step", "µs a step (median)", "each pass"],
        [[name, f"{median(values):.0f}", " ".join(f"{v:.0f}" for v in values)] for name, values in figures.items()],
    )
    print(f"eager / graphed: {results['eager_over_graphed']:.2f}; the two copies' bits after {eager.steps} steps: "
          f"{'equal' if results['bitwise_equal'] else 'DIFFER'}")  # fmt: skip
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), **results})


def summary(us_per_step: dict[str, list[float]], capture_s: float, steps: int, same_bits: bool) -> dict[str, Any]:
    """The figures this bench writes (``--json``) and the GPU check's stage g reads."""
    ratio = median(us_per_step["eager"]) / median(us_per_step["graphed"])
    return {"cuda": True, "us_per_step": us_per_step, "capture_s": capture_s, "eager_over_graphed": ratio,
            "steps": steps, "bitwise_equal": same_bits}  # fmt: skip


if __name__ == "__main__":
    main()
