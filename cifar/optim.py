"""The optimizer and learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import math

import torch
from torch import nn

from cifar.config import TrainConfig
from cifar.models import SpeedrunNet
from cifar.sgd import NesterovSGD


def build_optimizer(
    config: TrainConfig, model: nn.Module, steps_per_epoch: int
) -> tuple[NesterovSGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with Nesterov momentum (torch's arithmetic, in less host time: cifar/sgd.py) and a
    per-step schedule: linear warm-up, then cosine or linear decay to ``final_lr_factor``.

    Four parameter groups: weights; BatchNorm biases, whose learning rate is
    scaled by ``norm_bias_lr_scale`` and weight decay divided by it (each step
    decays them as much as the weights); other biases and norm weights; and the
    speedrun model's whitening bias, which stops training after
    ``whiten_bias_epochs``. Frozen parameters are left out.
    """
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    whitening_biases = {id(m.whiten.bias) for m in model.modules() if isinstance(m, SpeedrunNet)}
    weights, scaled, others, whitening = [], [], [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in whitening_biases:
            whitening.append(parameter)
        elif id(parameter) in norm_biases:
            scaled.append(parameter)
        else:
            (weights if parameter.ndim > 1 else others).append(parameter)
    small_decay = config.weight_decay if config.decay_norms_and_biases else 0.0
    scale = config.norm_bias_lr_scale
    groups = [
        {"params": weights, "weight_decay": config.weight_decay},
        {"params": scaled, "lr": config.lr * scale, "weight_decay": small_decay / scale},
        {"params": others, "weight_decay": small_decay},
        {"params": whitening, "weight_decay": small_decay},
    ]
    optimizer = NesterovSGD([group for group in groups if group["params"]], lr=config.lr, momentum=config.momentum)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    whitening_steps = config.whiten_bias_epochs * steps_per_epoch
    start, end = config.warmup_start_factor, config.final_lr_factor

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1 - start) * (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if config.schedule == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        return end + (1 - end) * (1.0 - progress)

    def whitening_factor(step: int) -> float:
        return lr_factor(step) if step < whitening_steps else 0.0

    factors = [lr_factor, lr_factor, lr_factor, whitening_factor]  # one per group, in order
    used = [factor for group, factor in zip(groups, factors, strict=True) if group["params"]]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, used)


def set_whitening_bias_training(model: nn.Module, epoch: int, config: TrainConfig, *, always: bool = False) -> None:
    """Let the speedrun model's whitening bias have a gradient only in its first
    ``whiten_bias_epochs`` epochs, or in every epoch with ``always``; other models
    are left as they are.

    Call it at the start of every epoch, on the unwrapped model. After those epochs
    the schedule of :func:`build_optimizer` gives the bias a learning rate of 0, so
    its gradient moves nothing; not computing it spares three backward operations at
    full image size: the gradient of the second convolution's input, GELU's and the
    bias's sum over every pixel (airbench94 switches it off too). The other
    gradients, and so the weights, are the same either way. Two things do see the
    bias's gradient, and need ``always``: DistributedDataParallel, which waits for a
    gradient of every parameter it was built with and raises when one gets none; and
    fp16's gradient scaler, which skips the step when any gradient overflows, the
    bias's included.
    """
    trains = always or epoch < config.whiten_bias_epochs
    for module in model.modules():
        if isinstance(module, SpeedrunNet):
            module.whiten.bias.requires_grad_(trains)
