"""Test-time augmentation: the model's logits averaged over flipped and shifted views.

Level 0 is the plain image; level 1 averages it with its mirror image; level 2
(airbench's) also averages the mirrored pair of the image shifted by one pixel
up-left and down-right, with mirrored borders, at half the weight. Every view
is a flip or a gather by index: deterministic on CUDA in strict mode.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar.device_data import reflect

MAX_LEVEL = 2


def shifted(images: torch.Tensor, offset: int) -> torch.Tensor:
    """Images (N, C, H, W) moved by ``offset`` pixels down and right, the border mirrored in."""
    height, width = images.shape[-2:]
    rows = reflect(torch.arange(height, device=images.device) - offset, height)
    columns = reflect(torch.arange(width, device=images.device) - offset, width)
    return images.index_select(2, rows).index_select(3, columns)


def tta_logits(model: nn.Module, images: torch.Tensor, level: int) -> torch.Tensor:
    """The float32 logits of ``model`` for ``images``, averaged over the views of ``level``."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in [0, {MAX_LEVEL}], got {level}")

    def mirrored(views: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(views).float() + 0.5 * model(views.flip(-1)).float()

    if level == 0:
        return model(images).float()
    if level == 1:
        return mirrored(images)
    return 0.5 * mirrored(images) + 0.25 * (mirrored(shifted(images, 1)) + mirrored(shifted(images, -1)))
