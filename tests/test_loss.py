"""cifar.loss: the label-smoothed cross-entropy equals torch's, value and gradient, bit for
bit, in fewer tensor operations; train.py's step uses it."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, clean_env
from torch import nn
from torch.nn import functional
from torch.utils._python_dispatch import TorchDispatchMode

import train
from cifar.config import parse_config
from cifar.loss import label_smoothed_cross_entropy


def value_and_gradient(loss_function, logits: torch.Tensor, labels: torch.Tensor, smoothing: float):
    leaf = logits.detach().clone().requires_grad_()
    loss = loss_function(leaf, labels, smoothing)
    loss.backward()
    return loss.detach(), leaf.grad


def torch_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return functional.cross_entropy(logits, labels, label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.05, 0.2, 0.3])
def test_value_and_gradient_equal_torchs_bit_for_bit(smoothing):
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        # Batch sizes that are not powers of two, where a division by a reciprocal would round differently.
        count = int(torch.randint(1, 1500, (), generator=generator))
        classes = int(torch.randint(2, 110, (), generator=generator))
        scale = float(torch.rand((), generator=generator)) * 40
        logits = torch.randn(count, classes, generator=generator) * scale
        labels = torch.randint(0, classes, (count,), generator=generator)
        expected = value_and_gradient(torch_loss, logits, labels, smoothing)
        got = value_and_gradient(label_smoothed_cross_entropy, logits, labels, smoothing)
        assert torch.equal(got[0], expected[0]), (count, classes, scale)
        assert torch.equal(got[1], expected[1]), (count, classes, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_network_trained_with_it_under_autocast_gets_torchs_gradients(dtype):
    torch.manual_seed(0)
    images, labels = torch.randn(48, 3, 8, 8), torch.randint(0, 10, (48,))
    gradients = []
    for loss_function in (torch_loss, label_smoothed_cross_entropy):
        torch.manual_seed(1)
        # Autocast computes the convolution and the linear layer in ``dtype``: the logits come in it.
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GELU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_function(model(images), labels, 0.2)
        loss.backward()
        gradients.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    (expected_loss, expected), (loss, got) = gradients
    assert loss.dtype == torch.float32 and torch.equal(loss, expected_loss)
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


class OperationCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operations: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operations(loss_function) -> collections.Counter[str]:
    logits, labels = torch.randn(64, 10, requires_grad=True), torch.randint(0, 10, (64,))
    with OperationCounter() as counter:
        loss_function(logits, labels, 0.2).backward()
    return counter.operations


def test_byte_labels_and_float64_logits_under_autocast_as_torch_takes_them():
    logits, labels = torch.randn(300, 10, dtype=torch.float64), torch.randint(0, 10, (300,), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = value_and_gradient(torch_loss, logits, labels, 0.2)
        got = value_and_gradient(label_smoothed_cross_entropy, logits, labels, 0.2)
    assert got[0].dtype == torch.float64
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


MASKING = ("aten.eq", "aten.bitwise_not", "aten.masked_fill_", "aten.masked_fill", "aten.neg")


def test_it_dispatches_none_of_torchs_ignore_index_operations():
    theirs, ours = operations(torch_loss), operations(label_smoothed_cross_entropy)
    assert all(theirs[name] > 0 for name in MASKING)
    assert not any(ours[name] for name in MASKING), ours
    assert sum(theirs.values()) - sum(ours.values()) >= 6


@pytest.mark.parametrize("chunks", [1, 2])
def test_train_py_steps_with_it_and_splits_only_a_batch_it_accumulates(chunks):
    config = parse_config(["--label-smoothing", "0.2", "--grad-accum-steps", str(chunks)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    with OperationCounter() as counter:
        loss = train.training_step(model, images, labels, config, Accelerator(cpu=True))
    assert torch.equal(loss, torch_loss(model(images), labels, 0.2)) if chunks == 1 else loss.isfinite()
    assert not any(counter.operations[name] for name in MASKING), counter.operations
    assert counter.operations["aten.split"] == (0 if chunks == 1 else 2)


# In a process of its own: accelerate keeps one mixed precision per process.
MIXED_PRECISION_STEP = """
import copy, json, torch
from accelerate import Accelerator
import train
from cifar.build import prepare_model
from cifar.config import parse_config
from cifar.models import SmallCNN


def prepared(model):
    return prepare_model(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))[0]


class Float32Head(SmallCNN):
    # A model's own decorator on its forward, which prepare_model must keep.
    @torch.autocast("cpu", enabled=False)
    def forward(self, x):
        return super().forward(x.float())


accelerator = Accelerator(cpu=True, mixed_precision="bf16")
config = parse_config(["--label-smoothing", "0.2", "--mixed-precision", "bf16"])
torch.manual_seed(0)
ours = SmallCNN(width=4)
theirs = accelerator.prepare(copy.deepcopy(ours))  # accelerate's forward wrapper on
compiled = prepared(torch.compile(copy.deepcopy(ours), backend="eager"))
ours = prepared(ours)
images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
same = []
for step in range(2):
    losses = [train.training_step(model, images, labels, config, accelerator) for model in (ours, theirs, compiled)]
    same += [torch.equal(losses[0], loss) for loss in losses[1:]]
    for mine, *others in zip(ours.parameters(), theirs.parameters(), compiled.parameters(), strict=True):
        same += [torch.equal(mine.grad, other.grad) for other in others]
        mine.grad = None
        for other in others:
            other.grad = None
evaluations = [train.evaluate(model, [(images, labels)], config, accelerator, 2) for model in (ours, theirs, compiled)]
head = prepared(Float32Head(width=4))
with accelerator.autocast():
    head_dtype = str(head(images).dtype)
print(json.dumps({
    "same": all(same) and evaluations[0] == evaluations[1] == evaluations[2],
    "ours_wrapped": ours.forward.__func__ is not type(ours).forward,
    "theirs_wrapped": getattr(theirs.forward, "__func__", None) is not type(theirs).forward,
    "decorated_forward_gives": head_dtype,
}))
"""


def test_mixed_precision_steps_without_accelerates_forward_wrapper_to_the_same_bits():
    # bf16 only: on the CPU accelerate turns fp16 off, wrapper and gradient scaler included.
    result = subprocess.run(
        [sys.executable, "-c", MIXED_PRECISION_STEP], cwd=REPO, env=clean_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    expected = {"same": True, "ours_wrapped": False, "theirs_wrapped": True, "decorated_forward_gives": "torch.float32"}
    assert outcome == expected


@pytest.mark.parametrize(
    ("shape", "smoothing", "message"),
    [
        ((8, 10), 1.0, "smoothing must be in"),
        ((8, 10), -0.1, "smoothing must be in"),
        ((8, 10, 2), 0.2, "expected logits"),
        ((7, 10), 0.2, "expected logits"),
    ],
)
def test_bad_arguments_are_refused(shape, smoothing, message):
    with pytest.raises(ValueError, match=message):
        label_smoothed_cross_entropy(torch.randn(shape), torch.zeros(8, dtype=torch.long), smoothing)
