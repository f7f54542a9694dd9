"""Host time of one optimizer step and ``zero_grad``: train.py's NesterovSGD against torch's SGD.

torch's SGD spends host time per parameter group, in Python, beside its tensor
operations; ``cifar/sgd.py`` takes the same operations with less of it. This
times both on the parameter groups a recipe's model gets from
``build_optimizer`` (the speedrun net's by default: four groups, their
rates and weight decays), each parameter replaced by a 4-element stand-in of
its number of dimensions, so that the update's compute is negligible and the
figure is the host's: Python, dispatch and, on CUDA, kernel launches. torch's
SGD runs twice: one parameter at a time (its choice on the CPU) and with
foreach operations (its choice on CUDA). The three alternate, ``--repeats``
times, each timing ``--steps`` steps with this thread's CPU time; the figure
is the median of the per-repetition ratios (bench/benchlib.py).

Before timing, it checks that ``NesterovSGD`` gives torch's bits on this
device: a few steps of the full-size model's parameters (channels_last on
CUDA, as train.py lays them out there) with torch's SGD as it runs here by
default, and the same with ``NesterovSGD``; parameters and momentum buffers
must be equal bit for bit, or the bench exits with status 1. On the CPU
``tests/test_sgd.py`` checks this; on CUDA only this does (stage h of the GPU
check runs it).

    python bench/optimizer_step.py
    python bench/optimizer_step.py --model resnet9 --repeats 21
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from statistics import median

import benchlib
import torch

from cifar.config import parse_config
from cifar.models import build_model
from cifar.optim import build_optimizer
from cifar.sgd import NesterovSGD

STAND_IN_SIZE = 4  # elements per stand-in parameter: a few, not one, so no kernel takes a scalar path


def stand_in_groups(model_name: str, device: torch.device) -> tuple[list[dict], float, float]:
    """The parameter groups ``build_optimizer`` makes for ``model_name`` under the speedrun
    recipe's config, each parameter replaced by a small tensor of its dimensions; and the
    optimizer's rate and momentum."""
    config = parse_config(["--config", str(benchlib.SPEEDRUN_CONFIG), "--dataset", "synthetic"])
    optimizer, _ = build_optimizer(config, build_model(model_name, 10), steps_per_epoch=100)
    groups = []
    for group in optimizer.param_groups:
        shapes = [(STAND_IN_SIZE,) + (1,) * (param.ndim - 1) for param in group["params"]]
        params = [torch.randn(shape, device=device, requires_grad=True) for shape in shapes]
        groups.append({"params": params, "lr": group["lr"], "weight_decay": group["weight_decay"]})
    return groups, config.lr, config.momentum


def same_bits_as_torch(model_name: str, device: torch.device, steps: int = 5) -> bool:
    """Whether ``steps`` steps of ``NesterovSGD`` and of torch's default SGD, on ``model_name``'s
    parameters and groups on ``device`` with the same random gradients, end in the same bits."""
    config = parse_config(["--config", str(benchlib.SPEEDRUN_CONFIG), "--dataset", "synthetic"])
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    finals = []
    for kind in ("torch SGD, default", "NesterovSGD"):
        torch.manual_seed(0)
        model = build_model(model_name, 10).to(device, memory_format=layout)
        optimizer, scheduler = build_optimizer(config, model, steps_per_epoch=steps)
        if kind != "NesterovSGD":
            optimizer = torch.optim.SGD(optimizer.param_groups, lr=config.lr, momentum=config.momentum, nesterov=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas)
        params = [param for param in model.parameters() if param.requires_grad]
        generator = torch.Generator(device).manual_seed(1)
        for _ in range(steps):
            for param in params:
                # Laid out as the parameter, as autograd lays out a gradient.
                gradient = torch.randn(param.shape, generator=generator, device=device)
                param.grad = gradient.to(memory_format=layout) if param.ndim == 4 else gradient
            optimizer.step()
            scheduler.step()
        finals.append([*params, *(optimizer.state[param]["momentum_buffer"] for param in params)])
    return all(a.stride() == b.stride() and benchlib.bitwise_equal(a, b) for a, b in zip(*finals, strict=True))


def build(kind: str, groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    copies = [{**group, "params": [p.detach().clone().requires_grad_() for p in group["params"]]} for group in groups]
    if kind == "NesterovSGD":
        return NesterovSGD(copies, lr=lr, momentum=momentum)
    foreach = kind == "torch SGD, foreach"
    return torch.optim.SGD(copies, lr=lr, momentum=momentum, nesterov=True, foreach=foreach)


def timer(optimizer: torch.optim.Optimizer, steps: int) -> Callable[[], float]:
    """A function that runs ``steps`` steps and returns µs of this thread's CPU time per step.
    The gradients are made before the clock starts: a backward's, for the parts it times."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    gradients = [[torch.randn_like(param) for param in params] for _ in range(steps)]

    def run() -> float:
        spent = 0.0
        for step_gradients in gradients:
            for param, gradient in zip(params, step_gradients, strict=True):
                param.grad = gradient
            start = time.thread_time()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            spent += time.thread_time() - start
        if params[0].is_cuda:
            torch.cuda.synchronize()
        return spent / steps * 1e6

    run()  # first steps start the momentum buffers
    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="speedrun", help="whose parameter groups (a name of cifar.models)")
    parser.add_argument("--steps", type=benchlib.positive_int, default=200, help="steps per timing")
    parser.add_argument(
        "--repeats", type=benchlib.positive_int, default=11, help="alternating timings of each optimizer"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    info = benchlib.environment()
    benchlib.print_environment(info)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    same_bits = same_bits_as_torch(args.model, device)
    print(
        f"# {args.model}'s parameters on {device}: NesterovSGD gives torch's SGD's bits: {'yes' if same_bits else 'NO'}"
    )
    groups, lr, momentum = stand_in_groups(args.model, device)
    kinds = ("torch SGD, per tensor", "torch SGD, foreach", "NesterovSGD")
    timers = {kind: timer(build(kind, groups, lr, momentum), args.steps) for kind in kinds}
    figures = benchlib.alternate(timers, args.repeats)
    sizes = [len(group["params"]) for group in groups]
    print(f"# {args.model}'s parameter groups ({sizes} parameters), on {device}: step + zero_grad, µs of CPU time")
    print()
    ours = figures["NesterovSGD"]
    rows = [
        [kind, f"{median(values):.0f}", f"{benchlib.median_ratio(values, ours):.2f}"]
        for kind, values in figures.items()
    ]
    benchlib.print_table(["optimizer", "µs per step (median)", "/ NesterovSGD (median of ratios)"], rows)
    benchlib.write_json(
        args.json, {"environment": info, "settings": vars(args), "same_bits": same_bits, "us_per_step": figures}
    )
    if not same_bits:
        sys.exit(f"NesterovSGD's parameters or buffers differ from torch's SGD's on {device}")


if __name__ == "__main__":
    main()
