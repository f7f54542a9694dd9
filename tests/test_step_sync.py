"""The training loop never makes the host wait for the GPU between epoch ends.

On a GPU the host queues each step and moves on; one ``.item()``, ``.tolist()``,
``bool(tensor)``, copy to the host, tensor made from Python data
(``torch.tensor(x, device=...)``), synchronisation or collective per step
makes it wait for the device instead, and the GPU idles while the host
prepares the next step. A CPU run cannot show that wait, so this test counts
those calls (tests/sync_probe.py) during the steps of each epoch of a real
train.py run, for both data pipelines, and in an evaluation, whose batches
must not wait one by one either.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import torch
from accelerate import Accelerator
from conftest import DATALOADER, REPO, TINY, clean_env, read_manifest
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import train
from cifar.config import parse_config


def test_no_synchronising_call_in_the_training_steps(tmp_path):
    device = [*TINY, "--output-dir", str(tmp_path / "device")]
    # One worker: the DataLoader's per-sample work (which reads CPU tensors) runs outside
    # the training process, as on a GPU machine. Two chunks take the step through no_sync.
    dataloader = [*TINY, *DATALOADER, "--num-workers", "1", "--grad-accum-steps", "2"]
    dataloader += ["--output-dir", str(tmp_path / "dataloader")]
    self_check = ["--self-check", *TINY, "--output-dir", str(tmp_path / "self-check")]
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sync_probe.py"), *device, "--", *dataloader, "--", *self_check],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == 3, result.stdout[-3000:]
    assert [run["status"] for run in runs] == [0, 0, 0]
    assert [run["steps"] for run in runs] == [16, 16, 16]  # TINY: 2 epochs of 256 / 32 steps, all watched
    calls = {pipeline: run["calls"] for pipeline, run in zip(("device", "dataloader"), runs[:2], strict=True)}
    assert calls == {"device": {}, "dataloader": {}}, f"calls that wait for the GPU in the steps: {calls}"
    # The probe finds an .item() added to each step: its counters and window work.
    assert list(runs[2]["calls"].values()) == [16], runs[2]["calls"]
    assert next(iter(runs[2]["calls"])).startswith("Tensor.item at train.py:")
    # The probe imported train.py without PYTHONHASHSEED: an import re-executes nothing, so the
    # runs record none (`python train.py` fixes it before its imports; test_train_cli.py checks that).
    assert read_manifest(tmp_path / "device")["python_hash_seed"] is None


class DeviceRoundTrips(TorchDispatchMode):
    """Counts the tensor operations that, on a GPU, make the host wait for it: a tensor made
    from Python data (a copy from pageable host memory) and a read of one value (``.item()``)."""

    WAITING = (torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default)

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WAITING:
            self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_an_evaluation_waits_for_the_gpu_once_not_at_every_batch():
    # The speedrun recipe's final evaluation, with test-time augmentation, is part of its GPU time.
    config = parse_config(["--tta-level", "2"])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    counted = []
    for loader in (batches[:1], batches):
        with DeviceRoundTrips() as mode:
            result = train.evaluate(model, loader, config, accelerator, config.tta_level)
        counted.append(mode.calls)
    assert result["test_images"] == 12
    assert counted[0] == counted[1], f"waits for one batch, then for three: {counted}"
