"""The model zoo, and the one place that turns an architecture name into a constructor.

Every constructor takes keyword arguments only (`in_channels`, `num_classes`, `input_size`, `width`),
so a variant file can name the architecture and its arguments and nothing else.

An architecture name is either a zoo name (a key of `MODELS`) or an import path
`package.module:function` naming a user constructor with the same keyword arguments that returns an
`nn.Module`. `resolve(name, allowed=...)` is the allow-list: zoo names always resolve; an import path
resolves only when it is listed in `allowed`, and it is checked (`check_allowed`) before anything is
imported. The cloud allows the path its operator named; an edge allows only the paths it was started
with (`prunefleet-edge run --allow-model PATH`, or the comma-separated `PRUNEFLEET_ALLOW_MODELS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from common.errors import PrunefleetError
from common.registry import (
    UnknownNameError,
    import_object,
    is_import_path,
    lookup,
    parse_import_path,
)

ALLOW_ENV = "PRUNEFLEET_ALLOW_MODELS"  # read by the edge CLI's main(), never at import time

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


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> nn.Module:
        return VGG(VGG_CONFIGS[name], in_channels, num_classes, input_size, width)

    return build


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> nn.Module:
        del input_size  # global pooling makes the network size-agnostic
        return ResNet(depth, in_channels, num_classes, width)

    return build


def _mobilenetv2(*, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: float = 1.0) -> nn.Module:
    del input_size  # global pooling makes the network size-agnostic
    return MobileNetV2(in_channels, num_classes, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    "mobilenetv2": _mobilenetv2,
}
CONSTRUCTOR_ARGS = frozenset({"in_channels", "num_classes", "input_size", "width"})


class ModelNotAllowedError(PrunefleetError, ValueError):
    """An import path that is well-formed but not on this process's allow-list."""


class ConstructorError(PrunefleetError, ValueError):
    """A user constructor that does not keep the zoo's contract (keyword arguments in, nn.Module out)."""


def check_allowed(name: str, allowed: Collection[str] = ()) -> None:
    """Raise unless `name` may be built here; never imports. Zoo names always may; an import path
    may when it is well-formed and listed in `allowed`; anything else is an unknown architecture."""
    if isinstance(allowed, str):
        raise TypeError("allowed must be a collection of names, not one string")
    if not isinstance(name, str):
        raise UnknownNameError(f"architecture must be a name, got {type(name).__name__}")
    if name in MODELS:
        return
    if not is_import_path(name):
        try:
            lookup(MODELS, "architecture", name)
        except UnknownNameError as err:
            raise UnknownNameError(f"{err}; or an import path package.module:function") from None
    parse_import_path(name)
    if name not in allowed:
        listed = ", ".join(sorted(p for p in allowed if p not in MODELS)) or "none"
        raise ModelNotAllowedError(f"import path {name!r} is not allowed here (allowed import paths: {listed})")


def parse_allow_list(entries: Iterable[str]) -> tuple[str, ...]:
    """Allow-list entries (flags, or the comma-separated `PRUNEFLEET_ALLOW_MODELS`), each checked:
    zoo names (always allowed anyway) or well-formed import paths. Sorted, without duplicates."""
    names = {name.strip() for entry in entries for name in entry.split(",") if name.strip()}
    for name in names:
        if name not in MODELS:
            parse_import_path(name)
    return tuple(sorted(names))


def _check_constructor(path: str, constructor: object) -> Callable[..., nn.Module]:
    if not callable(constructor):
        raise ConstructorError(f"{path!r} is not callable")
    try:
        inspect.signature(constructor).bind(**dict.fromkeys(CONSTRUCTOR_ARGS))
    except (TypeError, ValueError) as err:
        raise ConstructorError(
            f"{path!r} must accept the keyword arguments {sorted(CONSTRUCTOR_ARGS)} (and require no others): {err}"
        ) from None
    return constructor


def resolve(name: str, *, allowed: Collection[str] = ()) -> Callable[..., nn.Module]:
    """The constructor `name` stands for: a zoo entry, or, when `name` is an import path listed in
    `allowed`, the imported function (checked to take the zoo's keyword arguments). The allow-list
    check comes before any import."""
    check_allowed(name, allowed)
    if name in MODELS:
        return MODELS[name]
    return _check_constructor(name, import_object(name))


def build(arch: str, kwargs: dict, *, allowed: Collection[str] = ()) -> nn.Module:
    """Build an architecture by name (see `resolve` for names and `allowed`) with known arguments."""
    constructor = resolve(arch, allowed=allowed)
    unknown = set(kwargs) - CONSTRUCTOR_ARGS
    if unknown:
        raise ValueError(f"unknown constructor arguments for {arch}: {sorted(unknown)}")
    if arch in MODELS:
        return constructor(**kwargs)
    try:
        model = constructor(**kwargs)
    except Exception as err:  # user code: name it in the error, whatever it raised
        raise ConstructorError(f"{arch!r} failed with {kwargs}: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConstructorError(f"{arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def zoo_kwargs(input_shape: tuple[int, ...], num_classes: int, width: float) -> dict:
    """The keyword arguments every zoo constructor takes, for inputs of `input_shape` (C, H, W)."""
    return {"in_channels": input_shape[0], "num_classes": num_classes, "input_size": input_shape[1], "width": width}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers, by name: the weights that magnitude pruning ranks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
