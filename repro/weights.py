"""Hashes of model weights, to compare runs bitwise.

:func:`state_dict_sha256` is the ``weights_sha256`` of a run's manifest;
:func:`tensor_digests` hashes each tensor alone, so that a difference can be
traced to the first tensor that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict, buffers included, in key order.

    For each entry: the name in UTF-8 and a zero byte, the tensor's byte count
    as 8 little-endian bytes, then its raw bytes (row-major, native byte
    order). Name and length prefixes keep adjacent entries from running into
    each other.
    """
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        raw = _tensor_bytes(tensor)
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def tensor_digests(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Return ``{name: SHA-256 of the tensor's raw bytes}`` in key order."""
    return {name: hashlib.sha256(_tensor_bytes(tensor)).hexdigest() for name, tensor in state_dict.items()}
