"""Capture and restore every random generator of one process, as plain data.

A resumed run must continue every stream where it stopped: Python's
``random``, NumPy's global state, torch's CPU generator and the generator of
the CUDA device this process uses (one process per GPU, as launchers run it).
:func:`capture_rng_state` returns them as JSON-compatible data (integers,
strings and base64 text), so that a checkpoint stores them without pickle and
loading one never runs code. The format is versioned: :func:`restore_rng_state`
reads every version listed in ``SUPPORTED_VERSIONS``.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

FORMAT = "repro.rng"
VERSION = 1
SUPPORTED_VERSIONS = (1,)


def _encode(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """Return the state of every generator of this process as JSON-compatible data.

    When: at a checkpoint, after the optimizer step, in every process (each
    rank's state differs).
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    cuda = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only the current device: reading every device's state would create a
        # CUDA context on each GPU from each process of a multi-GPU run.
        device = torch.cuda.current_device()
        cuda[str(device)] = _encode(torch.cuda.get_rng_state(device))
    return {
        "format": FORMAT,
        "version": VERSION,
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(word) for word in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "cached_gaussian": float(numpy_state["gauss"]),
        },
        "torch_cpu": _encode(torch.get_rng_state()),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from :func:`capture_rng_state`'s data.

    When: on resume, after the model, optimizer and DataLoaders are built
    (building them may draw) and before the first training step.

    Raises:
        ValueError: the data is not a supported ``repro.rng`` state, or it holds
            CUDA states for more devices than this machine has.
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not a repro.rng state")
    if state.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"unsupported repro.rng version {state.get('version')!r}; this version reads {SUPPORTED_VERSIONS}"
        )
    try:
        python = state["python"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        numpy = state["numpy"]
        np.random.set_state(
            (
                numpy["bit_generator"],
                np.array(numpy["key"], dtype=np.uint32),
                numpy["pos"],
                numpy["has_gauss"],
                numpy["cached_gaussian"],
            )
        )
        torch.set_rng_state(_decode(state["torch_cpu"]))
        cuda_states = {int(device): _decode(text) for device, text in state["cuda"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"corrupt repro.rng state: {error}") from None
    for device, cuda_state in cuda_states.items():
        if device >= torch.cuda.device_count():
            raise ValueError(f"the RNG state is for CUDA device {device}, which this machine does not have")
        torch.cuda.set_rng_state(cuda_state, device)
