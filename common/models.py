"""The model zoo. `MODELS` doubles as the allow-list of architectures an edge may build.

Every constructor takes keyword arguments only (`in_channels`, `num_classes`, `input_size`, `width`),
so a variant file can name the architecture and its arguments and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.registry import lookup

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _scaled(channels: int, width: float) -> int:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """VGG with BatchNorm. Pools that would shrink the map below 1x1 are skipped (28x28 inputs)."""

    def __init__(self, config: list[int | str], in_channels: int, num_classes: int, input_size: int, width: float):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for entry in config:
            if entry == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = _scaled(int(entry), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Residual block; a 1x1 conv projection shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (depth = 6n + 2): three stages of n basic blocks, global average pooling."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: float):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem = _scaled(16, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages: list[nn.Module] = []
        channels = stem
        for stage, base in enumerate((16, 32, 64)):
            out = _scaled(base, width)
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out, stride))
                channels = out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.fc(torch.flatten(out, 1))


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> nn.Module:
        return VGG(VGG_CONFIGS[name], in_channels, num_classes, input_size, width)

    return build


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> nn.Module:
        del input_size  # global pooling makes the network size-agnostic
        return ResNet(depth, in_channels, num_classes, width)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
}
CONSTRUCTOR_ARGS = frozenset({"in_channels", "num_classes", "input_size", "width"})


def build(arch: str, kwargs: dict) -> nn.Module:
    """Build a zoo architecture; the name must be on the allow-list and the arguments known."""
    constructor = lookup(MODELS, "architecture", arch)
    unknown = set(kwargs) - CONSTRUCTOR_ARGS
    if unknown:
        raise ValueError(f"unknown constructor arguments for {arch}: {sorted(unknown)}")
    return constructor(**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers, by name: the weights that magnitude pruning ranks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
