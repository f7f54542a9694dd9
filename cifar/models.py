"""Networks for 32x32 images. None uses an adaptive pool: each ends in a mean or
max over the spatial dimensions, which has a deterministic CUDA backward, so all
pass :func:`repro.audit.audit_model` and run under strict determinism."""

from __future__ import annotations

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


MODELS = {"small_cnn": SmallCNN, "small_cnn_dropout": SmallCNNDropout, "resnet18": ResNet18, "resnet9": ResNet9}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build the named network with freshly initialised weights (from torch's CPU generator)."""
    return MODELS[name](num_classes=num_classes)
