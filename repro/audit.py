"""Model audit: find what has no deterministic CUDA implementation.

Strict determinism raises on CUDA, at the first step, for some common modules
that pass on the CPU (the list in ``torch.use_deterministic_algorithms``'s
documentation). :func:`audit_model` finds them before training starts, on any
machine, so a run can refuse to start with a message that names the module and
a fix. It looks at the modules of the model and, given an example input, also
at the operators a forward pass runs (``F.interpolate`` and other functional
calls have no module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Finding:
    """One module or operator that raises under strict determinism on CUDA."""

    where: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}; fix: {self.fix}"


_POOL_FIX = "use a fixed-size pool (F.avg_pool2d with the input's size) or x.mean(dim=(2, 3))"
_INTERPOLATE_FIX = "use mode='nearest', or a transposed convolution"

_MODULE_RULES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.AdaptiveAvgPool2d, _POOL_FIX),
    (nn.AdaptiveAvgPool3d, _POOL_FIX),
    (nn.AdaptiveMaxPool2d, "use a fixed-size max pool (F.max_pool2d with the input's size) or x.amax(dim=(2, 3))"),
    (nn.AvgPool3d, "use AvgPool2d over reshaped inputs, or a strided convolution"),
    (nn.FractionalMaxPool2d, "use a fixed MaxPool2d"),
    (nn.FractionalMaxPool3d, "use a fixed MaxPool3d"),
    (nn.MaxUnpool1d, "use nearest upsampling or a transposed convolution"),
    (nn.MaxUnpool2d, "use nearest upsampling or a transposed convolution"),
    (nn.MaxUnpool3d, "use nearest upsampling or a transposed convolution"),
    (nn.ReflectionPad1d, "use zero padding, or ReplicationPad1d"),
    (nn.ReflectionPad2d, "use zero padding, or ReplicationPad2d"),
    (nn.ReflectionPad3d, "use zero padding, or ReplicationPad3d"),
    (nn.CTCLoss, "compute the loss on the CPU"),
)

_NONDETERMINISTIC_INTERPOLATION = ("linear", "bilinear", "bicubic", "trilinear")

# ATen operators (forward or backward on CUDA) that raise in strict mode.
_OPERATOR_RULES: dict[str, str] = {
    "_adaptive_avg_pool2d": _POOL_FIX,
    "_adaptive_avg_pool3d": _POOL_FIX,
    "adaptive_max_pool2d": "use a fixed-size max pool or x.amax(dim=(2, 3))",
    "avg_pool3d": "use a strided convolution",
    "fractional_max_pool2d": "use a fixed max pool",
    "fractional_max_pool3d": "use a fixed max pool",
    "max_unpool2d": "use nearest upsampling or a transposed convolution",
    "max_unpool3d": "use nearest upsampling or a transposed convolution",
    "upsample_linear1d": _INTERPOLATE_FIX,
    "upsample_bilinear2d": _INTERPOLATE_FIX,
    "upsample_bicubic2d": _INTERPOLATE_FIX,
    "upsample_trilinear3d": _INTERPOLATE_FIX,
    "_upsample_bilinear2d_aa": _INTERPOLATE_FIX,
    "_upsample_bicubic2d_aa": _INTERPOLATE_FIX,
    "reflection_pad1d": "pad with zeros or replicate",
    "reflection_pad2d": "pad with zeros or replicate",
    "reflection_pad3d": "pad with zeros or replicate",
    "nll_loss2d_forward": "flatten the spatial dimensions to (N*H*W, C) before the loss",
    "_ctc_loss": "compute the loss on the CPU",
    "histc": "compute the histogram on the CPU",
    "bincount": "compute the weighted count on the CPU",
    "grid_sampler_2d": "avoid grid_sample in the trained path",
    "grid_sampler_3d": "avoid grid_sample in the trained path",
}


class _OperatorRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::", 1)[-1]
        if name in _OPERATOR_RULES and name not in self.seen:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def audit_model(model: nn.Module, example_input: Any = None) -> list[Finding]:
    """List the parts of ``model`` that raise under strict determinism on CUDA.

    Args:
        model: the model to audit; it is not modified.
        example_input: optional input (a tensor, or a tuple of positional
            arguments) for one forward pass on the CPU, in evaluation mode and
            without gradients, to catch functional calls. Without it, only
            modules are checked.

    Returns:
        One :class:`Finding` per offending module or operator; empty when the
        model is safe as far as the audit can see. It cannot see operators
        that a forward pass on this input does not reach.
    """
    findings = []
    for name, module in model.named_modules():
        where = f"{name or 'model'} ({type(module).__name__})"
        for module_type, fix in _MODULE_RULES:
            if isinstance(module, module_type):
                findings.append(Finding(where, "no deterministic CUDA backward", fix))
        if isinstance(module, nn.Upsample) and module.mode in _NONDETERMINISTIC_INTERPOLATION:
            findings.append(
                Finding(where, f"mode={module.mode!r} has no deterministic CUDA backward", _INTERPOLATE_FIX)
            )
        if isinstance(module, nn.EmbeddingBag) and module.mode == "max":
            findings.append(Finding(where, "mode='max' has no deterministic CUDA backward", "use mode='sum' or 'mean'"))
    if example_input is not None:
        arguments = example_input if isinstance(example_input, tuple) else (example_input,)
        was_training = model.training
        model.eval()
        recorder = _OperatorRecorder()
        try:
            with torch.no_grad(), recorder:
                model(*arguments)
        finally:
            model.train(was_training)
        for operator in recorder.seen:
            findings.append(
                Finding(f"operator aten::{operator}", "no deterministic CUDA implementation", _OPERATOR_RULES[operator])
            )
    return findings
