"""cifar.sgd: NesterovSGD takes torch's SGD steps bit for bit, shares its state, refuses
what it does not run, and merges the groups' momentum into fewer operations."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cifar.config import parse_config
from cifar.optim import build_optimizer
from cifar.sgd import NesterovSGD

STEPS = 6


def parameters() -> list[nn.Parameter]:
    """Parameters of the kinds a run has: conv weights in channels_last, a linear weight,
    biases, sizes that are not multiples of a vector, and two in float64 (one in a group
    of float32 ones: a list of mixed dtypes)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (10, 37), (37,), (8,), (1,), (5, 7)]
    tensors = [torch.randn(shape, generator=generator) for shape in shapes]
    tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    tensors[1] = tensors[1].contiguous(memory_format=torch.channels_last)
    tensors[4], tensors[6] = tensors[4].double(), tensors[6].double()
    return [nn.Parameter(tensor) for tensor in tensors]


def groups(params: list[nn.Parameter]) -> list[dict]:
    """Four groups as the recipe has them: their own rates and weight decays, one of them 0,
    and one group with its own momentum."""
    return [
        {"params": params[0:3], "weight_decay": 5e-4 * 1024 / 0.3},
        {"params": params[3:5], "lr": 0.3 * 64, "weight_decay": 5e-4 * 1024 / 0.3 / 64},
        {"params": params[5:6], "weight_decay": 0.0},
        {"params": params[6:7], "weight_decay": 1e-3, "momentum": 0.8},
    ]


def gradient(param: nn.Parameter, step: int, index: int) -> torch.Tensor | None:
    """A gradient like the parameter, different at every step; the third parameter has none
    before step 2 (its buffer starts later than the others') and the sixth none at step 4
    (frozen that step)."""
    if (index == 2 and step < 2) or (index == 5 and step == 4):
        return None
    generator = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(param.shape, generator=generator, dtype=param.dtype).contiguous(
        memory_format=torch.channels_last if param.ndim == 4 else torch.contiguous_format
    )


def train(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: range) -> None:
    """Steps with :func:`gradient`'s gradients, left as the last step leaves them."""
    for step in steps:
        for index, param in enumerate(params):
            param.grad = gradient(param, step, index)
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= 0.7  # a schedule's move, as LambdaLR makes it


def torch_sgd(params: list[nn.Parameter], foreach: bool | None) -> torch.optim.SGD:
    return torch.optim.SGD(groups(params), lr=0.3, momentum=0.9, nesterov=True, foreach=foreach)


def assert_same_bits(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def buffers(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [optimizer.state[param]["momentum_buffer"] for param in params]


@pytest.mark.parametrize("foreach", [None, True], ids=["torch-default", "torch-foreach"])
def test_steps_equal_torchs_sgd_bit_for_bit(foreach):
    # torch's default on the CPU steps one parameter at a time; foreach is its default on CUDA.
    ours, theirs = parameters(), parameters()
    optimizer = NesterovSGD(groups(ours), lr=0.3, momentum=0.9)
    train(optimizer, ours, range(STEPS))
    reference = torch_sgd(theirs, foreach)
    train(reference, theirs, range(STEPS))
    assert_same_bits(ours, theirs)
    assert_same_bits(buffers(optimizer, ours), buffers(reference, theirs))  # their layouts too
    if foreach:  # it leaves the gradients as torch's foreach step does (the per-tensor one leaves them alone)
        assert_same_bits([param.grad for param in ours], [param.grad for param in theirs])
    moved = parameters()
    assert all(not torch.equal(a, b) for a, b in zip(ours, moved, strict=True))


def test_its_state_and_torchs_load_into_each_other():
    # A checkpoint written before this optimizer (torch's SGD) resumes into it, and back.
    ours, theirs = parameters(), parameters()
    first, reference = NesterovSGD(groups(ours), lr=0.3, momentum=0.9), torch_sgd(theirs, foreach=None)
    train(reference, theirs, range(3))
    with torch.no_grad():
        for mine, its in zip(ours, theirs, strict=True):
            mine.copy_(its)
    first.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a file: its own tensors
    train(first, ours, range(3, STEPS))
    back = torch_sgd(parameters(), foreach=True)
    back.load_state_dict(copy.deepcopy(first.state_dict()))
    train(reference, theirs, range(3, STEPS))
    assert_same_bits(ours, theirs)
    assert_same_bits(buffers(first, ours), buffers(reference, theirs))
    assert_same_bits(buffers(back, back.param_groups[0]["params"])[:3], buffers(reference, theirs)[:3])


class ForeachCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def foreach_calls(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    train(optimizer, params, range(3))  # every buffer started: the steps a run takes from then on
    for index, param in enumerate(params):
        param.grad = gradient(param, 3, index)
    with ForeachCounter() as counter:
        optimizer.step()
    # Besides the update's operations only the profiler's label of every optimizer step (torch's hook).
    foreach = {name: count for name, count in counter.counts.items() if name.startswith("_foreach")}
    assert set(counter.counts) - set(foreach) <= {"_record_function_enter_new", "_record_function_exit"}
    return sum(foreach.values())


def test_the_groups_momentum_runs_in_one_call_per_momentum():
    # Per group: the weight decay (three of the four decay) and the update; the buffers' two
    # operations and the Nesterov direction once for the three groups of momentum 0.9 and once
    # for the fourth. torch runs the five per group, and per dtype within one: twice for the
    # group that holds a float32 and a float64 parameter.
    ours, theirs = parameters(), parameters()
    assert foreach_calls(NesterovSGD(groups(ours), lr=0.3, momentum=0.9), ours) == 3 + 4 + 2 * 3
    assert foreach_calls(torch_sgd(theirs, foreach=True), theirs) == 3 + 4 * 4 + 5


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_what_it_does_not_run_as_torch_does_is_refused_when_added():
    params = parameters()
    optimizer = NesterovSGD(params[:1], lr=0.3, momentum=0.9)
    with pytest.raises(ValueError, match="float32 or float64"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]})
    with pytest.raises(ValueError, match="each parameter once"):
        optimizer.add_param_group({"params": [params[1], params[1]]})
    assert len(optimizer.param_groups) == 1


def test_a_checkpoint_it_would_not_step_as_torch_does_is_refused_before_loading():
    params = parameters()
    optimizer = NesterovSGD(groups(params), lr=0.3, momentum=0.9)
    train(optimizer, params, range(2))
    saved = optimizer.state_dict()
    for setting, value in (("maximize", True), ("dampening", 0.5), ("nesterov", False), ("fused", True)):
        changed = copy.deepcopy(saved)
        changed["param_groups"][1][setting] = value
        with pytest.raises(ValueError, match="cannot load a group"):
            optimizer.load_state_dict(changed)
        assert optimizer.param_groups[1][setting] == saved["param_groups"][1][setting]


def test_zero_grad_drops_or_zeroes_the_gradients():
    params = parameters()
    optimizer = NesterovSGD(groups(params), lr=0.3, momentum=0.9)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.zero_grad(set_to_none=False)
    assert all(param.grad is not None and not param.grad.any() for param in params)
    optimizer.zero_grad()
    assert all(param.grad is None for param in params)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"dampening": 0.1}, "dampening == 0"),
        ({"nesterov": False}, "nesterov"),
        ({"maximize": True}, "not maximize"),
        ({"foreach": True}, "foreach unset"),
        ({"fused": True}, "not fused"),
        ({"lr": torch.tensor(0.1)}, "a float lr"),
        ({"momentum": 0.0}, "momentum > 0"),
    ],
)
def test_options_it_does_not_run_are_refused(option, message):
    params = parameters()
    optimizer = NesterovSGD(params[:1], lr=0.3, momentum=0.9)
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": params[1:2], **option})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError):
        NesterovSGD(params, lr=0.3, momentum=0.0)


def test_a_sparse_gradient_is_refused():
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = NesterovSGD(embedding.parameters(), lr=0.1, momentum=0.9)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="dense gradients only"):
        optimizer.step()


def test_the_recipe_builds_it():
    config = parse_config(["--config", "configs/cifar10_speedrun.yaml", "--dataset", "synthetic"])
    optimizer, _ = build_optimizer(config, nn.Linear(4, 2), steps_per_epoch=10)
    assert isinstance(optimizer, NesterovSGD)
