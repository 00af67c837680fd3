"""The zoo's networks: VGG, CIFAR-style ResNet and MobileNetV2 for small images, all with BatchNorm.

Each takes plain numbers (input channels, classes, input size where it matters: an int for square
images or (H, W), as `image_size` reads it; and a width multiplier that scales every channel count).
The zoo (`common.models`) wraps each in a keyword-only constructor that a variant file can name;
nothing else builds these classes by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def image_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a constructor's `input_size`: one int for square images, or [H, W]."""
    sides = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(sides) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sides):
        raise ValueError(f"input_size must be a positive int or [H, W] of positive ints, got {input_size!r}")
    return sides


def _scaled(channels: int, width: float) -> int:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """VGG with BatchNorm. Pools that would shrink the map below 1x1 are skipped (28x28 inputs). The
    classifier reads the last map whole: its size follows from `input_size` (an int, or [H, W])."""

    def __init__(
        self, config: list[int | str], in_channels: int, num_classes: int, input_size: int | Sequence[int], width: float
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels, (rows, cols) = in_channels, image_size(input_size)
        for entry in config:
            if entry == "M":
                if min(rows, cols) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    rows, cols = rows // 2, cols // 2
                continue
            out = _scaled(int(entry), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * rows * cols, num_classes)

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


# MobileNetV2 stages as (expansion, output channels, blocks, stride of the first block). CIFAR-style:
# a stride-1 stem and three downsamplings instead of five, early (in the 24-, 32- and 64-channel stages:
# 28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4) so that few layers run at full resolution, and one block fewer
# in the 64-, 96- and 160-channel stages: 1.7 M parameters at width 1, 0.46 M at width 0.5.
MOBILENETV2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 3, 2),
    (6, 96, 2, 1),
    (6, 160, 2, 1),
    (6, 320, 1, 1),
)
MOBILENETV2_STEM, MOBILENETV2_FEATURES = 32, 1280


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return layers + [nn.ReLU6(inplace=True)] if relu6 else layers


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped at expansion 1), 3x3 depthwise, 1x1 linear projection; the input is added
    back when the stride is 1 and the channel count does not change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = _conv_bn(in_channels, hidden, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += _conv_bn(hidden, out_channels, 1, relu6=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images: stem, inverted residual stages, 1x1 conv to the feature width,
    global average pooling, linear classifier. Every width (the features too) scales with `width`."""

    def __init__(self, in_channels: int, num_classes: int, width: float):
        super().__init__()
        channels = _scaled(MOBILENETV2_STEM, width)
        self.stem = nn.Sequential(*_conv_bn(in_channels, channels, 3))
        blocks: list[nn.Module] = []
        for expansion, base, count, stride in MOBILENETV2_STAGES:
            out = _scaled(base, width)
            for block in range(count):
                blocks.append(InvertedResidual(channels, out, stride if block == 0 else 1, expansion))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        features = _scaled(MOBILENETV2_FEATURES, width)
        self.head = nn.Sequential(*_conv_bn(channels, features, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(torch.flatten(out, 1))
