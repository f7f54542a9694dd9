"""The training loss: cross-entropy with label smoothing, in fewer tensor operations than torch's.

``nn.CrossEntropyLoss(label_smoothing=s)`` is ``(1 - s) * nll + s / C * smooth``,
where ``smooth`` is the mean over samples of minus the sum of the log-probabilities.
torch also masks the samples whose label is ``ignore_index`` out of ``smooth`` and
counts the others: four operations (``eq``, ``masked_fill_``, ``bitwise_not``,
``sum``) and a ``masked_fill`` in the backward pass, every step, that change
nothing when no label is ignored, as none is here. On a GPU each operation is a
kernel the host launches; train.py's step is about 200 of them.

:func:`label_smoothed_cross_entropy` computes the same terms in the same order,
without the mask, and with the sign of ``smooth`` carried by its constant factor
(negation is exact in floating point: ``-(a + b) == (-a) + (-b)`` and
``-a * b == a * -b`` bit for bit): the same loss and the same gradient, bit for
bit, in six kernels fewer, forward and backward (``tests/test_loss.py``
compares both with torch's).
"""

from __future__ import annotations

import torch
from torch.nn import functional


def label_smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The mean cross-entropy of ``logits`` (N, C) against class ``labels`` (N,), with each
    target spread as ``1 - smoothing`` on its class and ``smoothing / C`` on every class.

    Equal, value and gradient, to ``functional.cross_entropy(logits, labels,
    label_smoothing=smoothing)`` for labels in ``[0, C)``; call it wherever that is
    called, inside autocast too (there, like torch's, it computes in float32).
    ``smoothing`` 0 is plain cross-entropy.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if smoothing == 0:
        return functional.cross_entropy(logits, labels)
    if torch.is_autocast_enabled(logits.device.type) and logits.dtype != torch.float64:
        # Autocast runs torch's cross-entropy in float32 (float64 it leaves), but not, on the
        # CPU, a log-softmax.
        logits = logits.float()
    log_probs = functional.log_softmax(logits, 1)
    nll = functional.nll_loss(log_probs, labels)
    # torch divides by the count of unignored labels, a tensor on the device; a Python
    # number would let CUDA multiply by its reciprocal instead, which rounds differently.
    count = labels.new_full((), len(labels), dtype=torch.int64)
    smooth = log_probs.sum(1).sum() / count * -(smoothing / logits.shape[1])
    return (1 - smoothing) * nll + smooth
