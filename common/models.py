"""The model zoo, and the one place that turns an architecture name into a constructor.

Every constructor takes keyword arguments only (`in_channels`, `num_classes`, `input_size` (an int
for square images, or [H, W]), `width`), so a variant file can name the architecture and its
arguments and nothing else.

The networks themselves are in `common.architectures`; torchvision's, adapted to the same arguments,
in `common.vision_models`.

An architecture name is a zoo name (a key of `MODELS`), a torchvision classification model
`torchvision:NAME`, or an import path `package.module:function` naming a user constructor with the
same keyword arguments that returns an `nn.Module`. `resolve(name, allowed=...)` is the allow-list:
zoo and torchvision names always resolve (torchvision is imported only then); an import path
resolves only when it is listed in `allowed`, and it is checked (`check_allowed`) before anything is
imported. The cloud allows the path its operator named; an edge allows only the paths it was started
with (`prunefleet-edge run --allow-model PATH`, or the comma-separated `PRUNEFLEET_ALLOW_MODELS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterable, Sequence

from torch import nn

from common import vision_models
from common.architectures import VGG, VGG_CONFIGS, MobileNetV2, ResNet
from common.errors import PrunefleetError
from common.registry import (
    ALLOW_ENV,  # noqa: F401  (kept here too: the edge allow-list's variable, read by the edge CLI's main())
    UnknownNameError,
    import_object,
    is_import_path,
    lookup,
    parse_import_path,
)

ZOO_WIDTH = 0.25  # the width a build takes unless told: small networks for small images
Size = int | Sequence[int]


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: Size = 28, width: float = 1.0) -> nn.Module:
        return VGG(VGG_CONFIGS[name], in_channels, num_classes, input_size, width)

    return build


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int = 1, num_classes: int = 10, input_size: Size = 28, width: float = 1.0) -> nn.Module:
        del input_size  # global pooling makes the network size-agnostic
        return ResNet(depth, in_channels, num_classes, width)

    return build


def _mobilenetv2(
    *, in_channels: int = 1, num_classes: int = 10, input_size: Size = 28, width: float = 1.0
) -> nn.Module:
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
    if vision_models.is_vision_name(name):
        vision_models.check_name(name)
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
    zoo and torchvision names (always allowed anyway) or well-formed import paths. Sorted, without
    duplicates."""
    names = {name.strip() for entry in entries for name in entry.split(",") if name.strip()}
    for name in names:
        if vision_models.is_vision_name(name):
            vision_models.check_name(name)
        elif name not in MODELS:
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
    """The constructor `name` stands for: a zoo entry, a torchvision model (`common.vision_models`:
    imports torchvision, refuses a NAME it does not know), or, when `name` is an import path listed in
    `allowed`, the imported function (checked to take the zoo's keyword arguments). The allow-list
    check comes before any import."""
    check_allowed(name, allowed)
    if name in MODELS:
        return MODELS[name]
    if vision_models.is_vision_name(name):
        return vision_models.constructor(name)
    return _check_constructor(name, import_object(name))


def build(arch: str, kwargs: dict, *, allowed: Collection[str] = ()) -> nn.Module:
    """Build an architecture by name (see `resolve` for names and `allowed`) with known arguments."""
    constructor = resolve(arch, allowed=allowed)
    unknown = set(kwargs) - CONSTRUCTOR_ARGS
    if unknown:
        raise ValueError(f"unknown constructor arguments for {arch}: {sorted(unknown)}")
    if arch in MODELS or vision_models.is_vision_name(arch):  # vetted constructors: their errors as they are
        return constructor(**kwargs)
    try:
        model = constructor(**kwargs)
    except Exception as err:  # user code: name it in the error, whatever it raised
        raise ConstructorError(f"{arch!r} failed with {kwargs}: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConstructorError(f"{arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_width(arch: str) -> float:
    """The width a build of `arch` takes unless told: 1.0 for torchvision's networks (their own
    size), `ZOO_WIDTH` for the zoo's and for import paths."""
    return vision_models.DEFAULT_WIDTH if vision_models.is_vision_name(arch) else ZOO_WIDTH


def zoo_kwargs(input_shape: tuple[int, ...], num_classes: int, width: float | None = None, arch: str = "") -> dict:
    """The keyword arguments every constructor takes, for inputs of `input_shape` (C, H, W): the size
    is one int for square inputs, [H, W] otherwise; a width of None is `arch`'s default
    (`default_width`), stored as the number it stands for."""
    channels, height, image_width = (int(d) for d in input_shape)
    return {
        "in_channels": channels,
        "num_classes": num_classes,
        "input_size": height if height == image_width else [height, image_width],
        "width": default_width(arch) if width is None else width,
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers, by name: the weights that magnitude pruning ranks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
