"""Host time of a mixed-precision forward: with accelerate's forward wrapper and without it.

In mixed precision ``accelerator.prepare`` wraps the model's forward in an
autocast of its own and a cast of the outputs to float32. train.py's
``prepare_model`` (cifar/build.py) removes that wrapper, since its step and
evaluation run the model under ``accelerator.autocast()`` already and cast
the logits to float32 themselves. This times train.py's ``training_step``
(forward, label-smoothed loss, backward) of a one-layer model on 3x3 images
(compute negligible: the figure is the host's Python, dispatch and, on CUDA,
kernel launches), in bf16 autocast, both ways, alternating ``--repeats``
times, each timing ``--steps`` steps with this thread's CPU time; the figure
is the median of the per-repetition ratios (bench/benchlib.py). The forward
alone is timed the same way. Before timing it checks that both ways give the
same loss and gradients, bit for bit, or exits with status 1
(``tests/test_loss.py`` checks train.py's step and evaluation in bf16 on the CPU).

    python bench/forward_wrapper.py
    python bench/forward_wrapper.py --batch-size 1024 --repeats 21
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from statistics import median

import benchlib
import torch
from accelerate import Accelerator
from torch import nn

import train
from cifar.build import prepare_model
from cifar.config import TrainConfig, parse_config

SIDE = 3


def timers_for(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    accelerator: Accelerator,
    steps: int,
) -> dict[str, Callable[[], float]]:
    """Functions that each run ``steps`` forwards, one of them with train.py's loss and
    backward (``training_step``), and return µs of this thread's CPU time per step."""
    images, labels = batch

    def forward() -> None:
        with torch.no_grad(), accelerator.autocast():  # one autocast a forward, as in train.py's step
            model(images)

    def step() -> None:
        train.training_step(model, images, labels, config, accelerator)
        model.zero_grad(set_to_none=True)

    def timed(work: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            start = time.thread_time()
            for _ in range(steps):
                work()
            spent = time.thread_time() - start
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            return spent / steps * 1e6

        run()
        return run

    return {"forward": timed(forward), "forward, loss and backward": timed(step)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch-size", type=benchlib.positive_int, default=64, help="images per step (small: compute negligible)"
    )
    parser.add_argument("--steps", type=benchlib.positive_int, default=500, help="steps per timing")
    parser.add_argument("--repeats", type=benchlib.positive_int, default=11, help="alternating timings of each way")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    info = benchlib.environment()
    benchlib.print_environment(info)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16")
    config = parse_config(["--config", str(benchlib.SPEEDRUN_CONFIG), "--mixed-precision", "bf16"])
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE**2, 10))
    wrapped = accelerator.prepare(copy.deepcopy(plain))
    plain, _ = prepare_model(accelerator, plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    models = {"accelerate's wrapper": wrapped, "prepare_model": plain}
    images = torch.randn(args.batch_size, 3, SIDE, SIDE, device=accelerator.device)
    batch = images, torch.randint(0, 10, (args.batch_size,), device=accelerator.device)

    losses = [train.training_step(model, *batch, config, accelerator) for model in models.values()]
    gradients = [[param.grad for param in model.parameters()] for model in models.values()]
    same_bits = benchlib.bitwise_equal(*losses) and all(map(benchlib.bitwise_equal, *gradients))
    print(f"# on {accelerator.device}, bf16: the same loss and gradients both ways: {'yes' if same_bits else 'NO'}")
    if not same_bits:
        sys.exit(f"the forward without accelerate's wrapper gives other bits on {accelerator.device}")

    timers = {name: timers_for(model, batch, config, accelerator, args.steps) for name, model in models.items()}
    figures, rows = {}, []
    for part in timers["prepare_model"]:
        figures[part] = benchlib.alternate({name: parts[part] for name, parts in timers.items()}, args.repeats)
        ours = figures[part]["prepare_model"]
        for name, values in figures[part].items():
            rows.append([part, name, f"{median(values):.1f}", f"{benchlib.median_ratio(values, ours):.3f}"])
    print(f"# batch {args.batch_size}, bf16 autocast: µs of CPU time per step, {args.repeats} alternating timings")
    print()
    benchlib.print_table(["what", "model", "µs per step (median)", "/ prepare_model's (median of ratios)"], rows)
    benchlib.write_json(args.json, {"environment": info, "settings": vars(args), "us_per_step": figures})


if __name__ == "__main__":
    main()
