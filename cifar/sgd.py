"""SGD with Nesterov momentum: torch's arithmetic, bit for bit, in less host time per step.

torch's ``SGD.step`` updates one parameter group at a time, and for each group
spends host time in Python beside the update (collecting its tensors, grouping
them by device and dtype, checking options no run of this pipeline uses): on
the host of an H200 machine its step took about 400 µs for a one-layer model
(BENCHMARKS.md, section 11). On a GPU that time is the GPU's to wait for when
the host falls behind.

:class:`NesterovSGD` runs the same operations on the same values:

- weight decay, ``grad + weight_decay * param``, per group;
- the momentum buffer, ``buffer * momentum + grad``, then the Nesterov
  direction, ``grad + momentum * buffer``, for all groups at once, as the
  groups share their momentum;
- the update, ``param - lr * direction``, per group.

Each is torch's foreach operation, as torch's SGD calls it on CUDA; on a CPU,
for float32 and float64 tensors, a foreach operation gives the bits of the
per-tensor one torch's SGD calls there. An element's result depends only on
its own parameter, gradient and buffer, so taking all groups' tensors in one
call changes no bit (``tests/test_sgd.py`` checks it against
``torch.optim.SGD`` on the CPU, ``bench/optimizer_step.py`` on its device).
Its state is torch's: checkpoints of either load into the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class NesterovSGD(torch.optim.SGD):
    """``torch.optim.SGD(params, lr, momentum, weight_decay=..., nesterov=True)``
    with dense gradients, in fewer host calls per step.

    Parameter groups may set their own ``lr``, ``weight_decay`` and ``momentum``
    (positive). What this step does not run as torch's does raises a ``ValueError``
    when a group is added or loaded (:meth:`load_state_dict`): the options dampening,
    no Nesterov, ``maximize``, ``foreach``, ``fused`` and ``differentiable``, a tensor
    ``lr``, a parameter twice, and parameters other than float32 and float64 (on the
    CPU torch's SGD multiplies a bfloat16 or float16 buffer by the momentum in float32,
    a foreach operation by the momentum rounded to the buffer's precision).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, refusing what :meth:`step` does not run as torch's SGD does."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        refused = _refused_settings(group)
        params = group["params"]
        if len({id(param) for param in params}) < len(params):
            refused.append("each parameter once")
        if any(param.dtype not in (torch.float32, torch.float64) for param in params):
            refused.append("float32 or float64 parameters")
        if refused:
            self.param_groups.pop()
            raise ValueError(f"NesterovSGD runs only groups with {', '.join(refused)}; use torch.optim.SGD")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, refusing a group whose settings :meth:`step` does not run (before loading anything)."""
        for group in state_dict["param_groups"]:
            refused = _refused_settings(group)
            if refused:
                raise ValueError(f"NesterovSGD cannot load a group without {', '.join(refused)}; use torch.optim.SGD")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; one without (frozen this step) keeps its
        value and its momentum buffer. In a group without weight decay the gradients are left
        holding the Nesterov directions, as torch's foreach step (CUDA's) leaves them: clear
        them with :meth:`zero_grad` before the next backward."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = []  # per group: its parameters with a gradient, their directions, its rate
        by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            grads = [param.grad for param in params]
            if any(grad.is_sparse for grad in grads):
                raise ValueError("NesterovSGD takes dense gradients only; use torch.optim.SGD for sparse ones")
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            updates.append((params, grads, group["lr"]))
            merged_params, merged_grads = by_momentum.setdefault(group["momentum"], ([], []))
            merged_params += params
            merged_grads += grads
        for momentum, (params, grads) in by_momentum.items():
            self._update_momentum(params, grads, momentum)
        for params, grads, lr in updates:
            torch._foreach_add_(params, grads, alpha=-lr)
        return loss

    def _update_momentum(self, params: list[torch.Tensor], grads: list[torch.Tensor], momentum: float) -> None:
        """Move each buffer (a parameter's first gradient starts it) and turn ``grads`` into the
        Nesterov directions, in place."""
        states = [self.state[param] for param in params]
        buffers = [state.get("momentum_buffer") for state in states]
        if all(buffer is not None for buffer in buffers):
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
        else:
            for index, (state, buffer, grad) in enumerate(zip(states, buffers, grads, strict=True)):
                if buffer is None:
                    buffers[index] = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buffer.mul_(momentum).add_(grad)
        torch._foreach_add_(grads, buffers, alpha=momentum)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none``, the default), without torch's profiler label and
        per-parameter checks; zeroing them in place is torch's."""
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None


def _refused_settings(group: dict[str, Any]) -> list[str]:
    """What ``group``'s settings need and do not have, for :class:`NesterovSGD` to step it as torch's SGD does."""
    needs = {
        "momentum > 0": group.get("momentum", 0) > 0,
        "dampening == 0": group.get("dampening", 0) == 0,
        "nesterov": group.get("nesterov", False),
        "not maximize": not group.get("maximize", False),
        "foreach unset": group.get("foreach") is None,
        "not fused": not group.get("fused"),
        "not differentiable": not group.get("differentiable", False),
        "a float lr": not isinstance(group.get("lr"), torch.Tensor),
    }
    return [name for name, holds in needs.items() if not holds]
