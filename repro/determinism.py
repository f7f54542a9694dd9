"""Determinism switches: strict, warn or off.

- ``strict``: ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic
  and not benchmarking, TF32 off, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
  (cuBLAS reads it when CUDA starts, so it must be set before CUDA is first
  touched). Nondeterministic operations raise. Torch's filling of
  uninitialised memory is off (see below).
- ``warn``: the same, but nondeterministic operations warn instead of raising.
- ``off``: cuDNN benchmarking and TF32 allowed: the fast, unreproducible baseline
  that benchmarks compare against.

``torch.utils.deterministic.fill_uninitialized_memory``, True by default,
makes deterministic mode fill every tensor that ``torch.empty`` and its kin
create (NaN for floats, the largest value for integers). That changes a result
only for code that reads memory it never wrote, a bug that no model or data
path of this project has; and it costs: on an H100 it took resnet18's training
step from 0.89 to 0.76 of off mode's speed (issue 12). So every mode sets it
False, and the returned settings record it. Code that does read memory it
never wrote can set it back to True after this call.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

MODES = ("strict", "warn", "off")
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def configure_determinism(mode: str) -> dict[str, Any]:
    """Apply determinism ``mode`` ("strict", "warn" or "off") to this process.

    When: before CUDA is initialised (before any tensor is moved to a GPU and
    before ``Accelerator()`` is created). If CUDA is already initialised in
    strict or warn mode, ``CUBLAS_WORKSPACE_CONFIG`` may come too late; a
    ``RuntimeWarning`` says so and the returned dict records it.

    Returns:
        The settings now in force, for the run's manifest.
    """
    if mode not in MODES:
        raise ValueError(f"determinism mode must be one of {', '.join(MODES)}, got {mode!r}")
    deterministic = mode != "off"
    cublas_in_time = True
    if deterministic:
        already_set = os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
        if not already_set:
            if torch.cuda.is_initialized():
                cublas_in_time = False
                warnings.warn(
                    "CUDA was initialised before configure_determinism() set "
                    "CUBLAS_WORKSPACE_CONFIG: cuBLAS may be nondeterministic in this process. "
                    "Call configure_determinism() first, or export CUBLAS_WORKSPACE_CONFIG=:4096:8.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(deterministic, warn_only=mode == "warn")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.set_float32_matmul_precision("highest" if deterministic else "high")
    # Without effect in off mode; set in every mode so that the setting never
    # depends on the modes this process went through before.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return determinism_settings(mode, cublas_in_time=cublas_in_time)


def determinism_settings(mode: str | None = None, *, cublas_in_time: bool = True) -> dict[str, Any]:
    """Report the determinism-relevant settings of this process as a dict."""
    return {
        "mode": mode,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cublas_config_effective": cublas_in_time and os.environ.get("CUBLAS_WORKSPACE_CONFIG") is not None,
    }
