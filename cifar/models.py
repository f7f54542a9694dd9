"""Networks for 32x32 images. None uses an adaptive pool: each ends in a mean or
max over the spatial dimensions, which has a deterministic CUDA backward, so all
pass :func:`repro.audit.audit_model` and run under strict determinism."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor, nn


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (16, 32, 64 channels): trains in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, width),
            nn.MaxPool2d(2),
            conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn(2 * width, 4 * width),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class SmallCNNDropout(SmallCNN):
    """SmallCNN with dropout (p=0.1) before the classifier. Its masks come from the
    runtime random stream at every training step, so a resume that did not restore
    the RNG state gives other weights: the tests use it to tell."""

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__(num_classes, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(x).mean(dim=(2, 3))))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR: a 3x3 stem without max-pool, four stages of two blocks,
    and a mean over the spatial dimensions instead of ``AdaptiveAvgPool2d``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 64)
        stages, in_channels = [], 64
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)


class ResNet9(nn.Module):
    """The ResNet-9 of the DAWNBench CIFAR-10 entries (Page, 2018): a fast network
    for ~94% in few epochs. Ends in a max over the spatial dimensions and a
    linear layer whose output is scaled by 0.125."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def stage(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(conv_bn(in_channels, out_channels), nn.MaxPool2d(2))

        self.body = nn.Sequential(
            conv_bn(3, 64),
            stage(64, 128),
            Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
            stage(128, 256),
            stage(256, 512),
            Residual(nn.Sequential(conv_bn(512, 512), conv_bn(512, 512))),
        )
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x).amax(dim=(2, 3))) * 0.125


class BiasOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a trainable bias and no trainable scale (the scale stays 1), as airbench's.

    ``momentum`` is PyTorch's: the weight of the new batch in the running
    statistics (airbench writes 0.6 for the old statistics' weight, so 0.4 here).
    """

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


def dirac_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 'same' convolution whose first ``in_channels`` filters start as the identity.

    The rest keep PyTorch's default initialisation: the block starts close to
    passing its input through, which lets the short schedule train fast.
    """
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


class ConvGroup(nn.Sequential):
    """conv, max-pool 2, BN, GELU, conv, BN, GELU: one of the speedrun net's three stages."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            dirac_conv(in_channels, out_channels),
            nn.MaxPool2d(2),
            BiasOnlyBatchNorm(out_channels),
            nn.GELU(),
            dirac_conv(out_channels, out_channels),
            BiasOnlyBatchNorm(out_channels),
            nn.GELU(),
        )


def patch_covariance(images: Tensor, kernel: int) -> Tensor:
    """The covariance (uncentred) of all ``kernel`` x ``kernel`` patches of ``images`` (N, C, H, W),
    its rows and columns ordered (C, kh, kw) like a convolution filter's weights.

    Computed in float64 on the device ``images`` are on, in chunks of 512 images:
    on a GPU where the run trains, rather than at the host's one thread. Its last
    bits depend on that device's matrix-product kernels (on a CPU, on its
    instruction set), which a run's environment fingerprint records.
    """
    size = images.shape[1] * kernel**2
    covariance = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.detach().to(torch.float64).split(512):
        # (N, C, H', W', kh, kw) -> one row per filter element and one column per patch: this
        # layout copies whole image rows, about twice as fast as one row per patch, and gives
        # the same covariance up to rounding: bit for bit on some CPUs, not on all
        # (bench/whitening.py, BENCHMARKS.md section 7.1).
        patch_rows = chunk.unfold(2, kernel, 1).unfold(3, kernel, 1).permute(1, 4, 5, 0, 2, 3).reshape(size, -1)
        covariance += patch_rows @ patch_rows.T
        count += patch_rows.shape[1]
    return covariance / max(count, 1)


class SpeedrunNet(nn.Module):
    """The network of airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single
    GPU", arXiv 2404.00498), written from the paper's description.

    A frozen 2x2 patch-whitening convolution (:meth:`init_whitening` sets it from
    training images; its bias trains for the first epochs only, see
    ``whiten_bias_epochs``), GELU, three :class:`ConvGroup` stages of 64, 256 and
    256 channels, a max over the remaining 3x3 pixels, and a bias-free linear
    layer whose output is scaled by 1/9.
    """

    WHITEN_KERNEL = 2
    WIDTHS = (64, 256, 256)
    LOGIT_SCALE = 1 / 9

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        patch_size = 3 * self.WHITEN_KERNEL**2
        # Each whitening filter and its negation: GELU then keeps both signs of every direction.
        self.whiten = nn.Conv2d(3, 2 * patch_size, self.WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        widths = (2 * patch_size, *self.WIDTHS)
        self.body = nn.Sequential(*(ConvGroup(a, b) for a, b in pairwise(widths)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images (N, 3, H, W).

        The filters are the eigenvectors of the covariance of all 2x2 patches,
        each divided by the square root of its eigenvalue (plus ``eps``), so the
        layer's outputs are decorrelated with unit variance. The covariance is
        computed in float64 on the device ``images`` are on (train.py: the run's),
        its 12 x 12 eigendecomposition on the host.
        """
        kernel = self.WHITEN_KERNEL
        size = 3 * kernel**2
        covariance = patch_covariance(images, kernel).cpu()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0).reshape(size, 3, kernel, kernel)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(nn.functional.gelu(self.whiten(x)))
        return self.head(features.amax(dim=(2, 3))) * self.LOGIT_SCALE


# The networks ``--model`` names. A model of this project is one entry here: a name
# (letters, digits, ``_``, ``.``, ``-``: it becomes part of the run folder's name) and
# a callable that builds the network from ``num_classes``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_cnn_dropout": SmallCNNDropout,
    "resnet18": ResNet18,
    "resnet9": ResNet9,
    "speedrun": SpeedrunNet,
}

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add ``builder`` to :data:`MODELS` under ``name``: the config then accepts ``model: name``.

    For a network defined outside this file, in the process that then parses
    the config (a test, say); a network of this project is one more entry in
    ``MODELS`` instead.
    ``builder(num_classes=N)`` must return a freshly initialised network.
    Raises ``ValueError`` for a name that is taken, or not letters, digits,
    ``_``, ``.`` and ``-`` (it becomes part of a folder name), and for a
    builder that is not callable.
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"a model name is letters, digits, '_', '.' and '-', starting with a letter or digit; got {name!r}"
        )
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if not callable(builder):
        raise ValueError(f"the builder of model {name!r} must be callable, got {builder!r}")
    MODELS[name] = builder


def model_names() -> tuple[str, ...]:
    """The names ``--model`` accepts, in registration order: the config checks against them."""
    return tuple(MODELS)


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build the named network with freshly initialised weights (from torch's CPU generator).

    Raises ``ValueError`` naming the registered models for an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)
