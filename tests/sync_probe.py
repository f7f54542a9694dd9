"""Run train.py in this process and count, during its training steps, the calls that make a host wait for a GPU.

    python tests/sync_probe.py TRAIN_ARGS... [-- [--self-check] TRAIN_ARGS...]...

Runs ``train.main`` once per group of arguments, one after the other, and
prints one JSON line for each: ``{"status": 0, "steps": N, "calls":
{"Tensor.item at train.py:123": count, ...}}``, where ``steps`` counts the
batches handed to the loop inside the counting window and each call is named
with the innermost line of this repository's code that made it. The window of
an epoch opens when its first batch is handed to the loop and closes when
train.py closes the epoch (``train.finish_epoch``) or the batches run out: it
covers every step and the production of every batch after the first, and
leaves out what an epoch's end does once (the loss read-out, the evaluation,
the checkpoint). A group that starts with ``--self-check`` runs with one
``.item()`` added to each training step, which the probe must count: a check
that its counters and its window work.

On a CPU none of these calls waits for anything, so the probe counts calls
rather than time: each one, on a GPU, would make the host wait for the queued
work (a read of a device value into Python, a copy to the host, a
synchronisation, a collective, a tensor made from Python data on the device).
DataLoader workers are separate processes: the calls they make are not
counted, and they never block the training process.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import accelerate  # noqa: E402
import torch  # noqa: E402
import torch.distributed  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import train  # noqa: E402

# (owner, attribute) of every call that, on a GPU, blocks the host until the device catches up.
SYNCHRONISING = [
    *((torch.Tensor, name) for name in ("item", "tolist", "numpy", "cpu", "nonzero")),
    *((torch.Tensor, name) for name in ("__bool__", "__float__", "__int__", "__index__", "__format__", "__array__")),
    (torch, "nonzero"),
    (torch.cuda, "synchronize"),
    (torch.cuda.Stream, "synchronize"),
    (torch.cuda.Event, "synchronize"),
    *((accelerate.Accelerator, name) for name in ("reduce", "gather", "gather_for_metrics", "wait_for_everyone")),
    *((torch.distributed, name) for name in ("all_reduce", "all_gather", "broadcast", "barrier", "reduce")),
]


class Window:
    """Whether the training steps of an epoch are under way, and what was called meanwhile."""

    def __init__(self) -> None:
        self.open = False
        self.steps = 0
        self.self_check = False  # add an .item() to each step, for the probe to find
        self.calls: collections.Counter[str] = collections.Counter()

    def count(self, label: str) -> None:
        self.calls[f"{label} at {caller()}"] += 1


def caller() -> str:
    """The innermost frame of this repository's code on the stack (file:line), else the direct caller."""
    frame = sys._getframe(3)
    direct = frame
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        # Not an installed package, though a virtual environment may live in the checkout.
        ours = path.is_relative_to(REPO) and "site-packages" not in path.parts
        if ours and path != Path(__file__).resolve():
            return f"{path.relative_to(REPO)}:{frame.f_lineno}"
        frame = frame.f_back
    return f"{direct.f_code.co_filename}:{direct.f_lineno}"


def counting(window: Window, label: str, original: Callable) -> Callable:
    """``original``, counting its calls in ``window`` while it is open."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if window.open:
            window.count(label)
        return original(*args, **kwargs)

    return wrapper


class Watched:
    """Training batches whose iteration opens the window for the steps of each epoch."""

    def __init__(self, batches: Any, window: Window) -> None:
        self.batches = batches
        self.window = window

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch in self.batches:
                self.window.open = True
                self.window.steps += 1
                yield batch
        finally:
            self.window.open = False


class TensorsFromPythonData(TorchDispatchMode):
    """Counts, in ``window``, the tensors made from Python data (``torch.tensor(x, device=...)``,
    ``new_tensor``): on a GPU each is a copy from pageable host memory, which waits for the
    queued work, and no patched Python call above sees it. On a CPU run every tensor is a
    host tensor, so all are counted, a host-only one too (GracefulStop's, with several ranks)."""

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.window.open and func is torch.ops.aten.lift_fresh.default:
            self.window.count("a tensor from Python data")
        return func(*args, **(kwargs or {}))


def install(window: Window) -> None:
    """Patch the counters in, and the window around the steps of train.py's training batches."""
    for owner, name in SYNCHRONISING:
        label = f"{getattr(owner, '__name__', owner)}.{name}"
        setattr(owner, name, counting(window, label, getattr(owner, name)))
    build_loaders = train.build_loaders

    @functools.wraps(build_loaders)
    def watched_loaders(*args: Any, **kwargs: Any) -> tuple:
        train_batches, sampler, test_batches = build_loaders(*args, **kwargs)
        return Watched(train_batches, window), sampler, test_batches

    train.build_loaders = watched_loaders
    finish_epoch = train.finish_epoch

    @functools.wraps(finish_epoch)
    def outside_the_steps(*args: Any, **kwargs: Any) -> Any:
        # train.py closes an epoch (its evaluation, record and checkpoint wait for the device,
        # as they may) after the last step, before it asks for the end of the epoch's batches.
        window.open = False
        return finish_epoch(*args, **kwargs)

    train.finish_epoch = outside_the_steps
    training_step = train.training_step

    @functools.wraps(training_step)
    def step_with_self_check(*args: Any, **kwargs: Any) -> Any:
        loss = training_step(*args, **kwargs)
        if window.self_check:
            loss.item()
        return loss

    train.training_step = step_with_self_check


def main(argv: list[str]) -> int:
    window = Window()
    install(window)
    runs = [[]]
    for arg in argv:
        if arg == "--":
            runs.append([])
        else:
            runs[-1].append(arg)
    for run_args in runs:
        window.self_check = run_args[:1] == ["--self-check"]
        window.steps, window.calls = 0, collections.Counter()
        with TensorsFromPythonData(window):
            status = train.main(run_args[window.self_check :])
        print(json.dumps({"status": status, "steps": window.steps, "calls": dict(window.calls)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
