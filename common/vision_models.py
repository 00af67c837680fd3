"""torchvision's classification networks under the zoo's constructor contract.

`torchvision:NAME` names the classification model NAME of `torchvision.models` (resnet18,
mobilenet_v2, efficientnet_b0, ...), built with random weights (`weights=None`) and adapted to the
contract every zoo constructor keeps (`in_channels`, `num_classes`, `input_size`, `width`):

- `num_classes` goes to the model's classifier; `in_channels` other than 3 replaces the first conv
  that reads the image by one with the same hyperparameters and the new input channels;
- `width` is the width multiplier of the families that have one (`width_mult` of MobileNetV2 and
  MobileNetV3, a factor on MNASNet's `alpha`); every other family takes only width 1.0;
- `input_size` (an int, or [H, W]) goes to the models whose constructor needs the image size (ViT's
  square `image_size`, MaxViT's `input_size`); the others pool globally and ignore it.

Like zoo names, these names are always allowed: each is a library's own constructor, not arbitrary
code. `check_name` judges a name's syntax without importing anything; torchvision is imported only
when a model is built (or the names are listed), so a process that never builds one (an edge serving
the zoo) runs without it, and one that does without it gets `VisionUnavailableError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import nn

from common.architectures import image_size
from common.errors import PrunefleetError
from common.registry import UnknownNameError

PREFIX = "torchvision:"
INSTALL_HINT = "pip install 'prunefleet[vision]'"
DEFAULT_WIDTH = 1.0
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
WIDTH_ARGUMENT = {name: "width_mult" for name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")}
MNASNET_ALPHA = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}
# Constructor arguments that keep a model inside the contract: one tensor of logits out, in every mode.
FIXED_ARGUMENTS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


class VisionUnavailableError(PrunefleetError, ImportError):
    """A torchvision architecture asked of a process without torchvision installed."""


class VisionModelError(PrunefleetError, ValueError):
    """Arguments a torchvision architecture cannot take (a width it has no multiplier for, an image
    size it cannot handle), or a failure of its constructor; the message names the architecture."""


def is_vision_name(name: object) -> bool:
    """Whether `name` is meant as a torchvision architecture (`torchvision:NAME`); `check_name` checks it."""
    return isinstance(name, str) and name.startswith(PREFIX)


def check_name(name: str) -> str:
    """The NAME of `torchvision:NAME` once its syntax is right (lowercase ASCII identifier, at most 64
    characters); never imports, so a name torchvision does not know passes here and fails in `constructor`."""
    model = name.removeprefix(PREFIX) if is_vision_name(name) else ""
    if not _NAME.fullmatch(model):
        raise UnknownNameError(
            f"malformed torchvision architecture {str(name)[:80]!r}; expected torchvision:NAME with NAME a "
            "classification model of torchvision.models (lowercase letters, digits, underscores)"
        )
    return model


def _torchvision(name: str) -> ModuleType:
    try:
        import torchvision.models
    except ImportError as err:
        raise VisionUnavailableError(f"architecture {name} needs torchvision: {INSTALL_HINT}") from err
    return torchvision.models


def classification_models() -> list[str]:
    """Every classification model torchvision offers, by NAME (imports torchvision)."""
    tv = _torchvision(f"{PREFIX}NAME")
    return sorted(tv.list_models(module=tv))


def constructor(name: str) -> Callable[..., nn.Module]:
    """The keyword-only constructor of `torchvision:NAME` (imports torchvision; an unknown NAME is an
    `UnknownNameError` listing the known ones)."""
    model = check_name(name)
    tv = _torchvision(name)
    known = sorted(tv.list_models(module=tv))
    if model not in known:
        raise UnknownNameError(f"unknown torchvision architecture {name!r}; known: {', '.join(known)}")

    def build(
        *, in_channels: int = 3, num_classes: int = 1000, input_size: int | Sequence[int] = 224, width: float = 1.0
    ) -> nn.Module:
        return _build(model, in_channels, num_classes, input_size, width)

    build.__name__ = model
    return build


def _build(model: str, in_channels: int, num_classes: int, input_size, width: float) -> nn.Module:
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise VisionModelError(f"{what} must be a positive int, got {value!r}")
    tv = _torchvision(PREFIX + model)
    arguments = {"num_classes": num_classes, **FIXED_ARGUMENTS.get(model, {})}
    arguments.update(_size_arguments(model, image_size(input_size)))
    alpha = _width_arguments(model, width, arguments)
    try:
        network = _construct(tv, model, alpha, arguments)
    except (AssertionError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise VisionModelError(f"{PREFIX}{model} failed with {arguments}: {type(err).__name__}: {err}") from err
    if in_channels != 3:
        _replace_first_conv(model, network, in_channels)
    return network


def _construct(tv: ModuleType, model: str, alpha: float | None, arguments: dict) -> nn.Module:
    """The network, on the default device. A constructor that computes its layer widths with tensors
    (RegNet) cannot run on the meta device: it is built on the CPU and moved there (the base model is
    allocated once, briefly)."""

    def construct() -> nn.Module:
        if alpha is not None:
            return _mnasnet_class(tv)(alpha, **arguments)
        return tv.get_model(model, weights=None, **arguments)

    try:
        return construct()
    except NotImplementedError:
        if torch.empty(()).device.type != "meta":
            raise
    with torch.device("cpu"):
        network = construct()
    return network.to("meta")


def _mnasnet_class(tv: ModuleType) -> type[nn.Module]:
    class MNASNet(tv.MNASNet):
        """torchvision's MNASNet, reading a state dict without torch's version records (a variant
        file's) as one of the current version."""

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
            metadata = {"version": self._version, **local_metadata}
            super()._load_from_state_dict(state_dict, prefix, metadata, *args)

    return MNASNet


def _width_arguments(model: str, width: float, arguments: dict) -> float | None:
    """Put the width multiplier where the family takes it; MNASNet's alpha (its builders fix it by
    name) is returned instead: the name's alpha times the width."""
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise VisionModelError(f"width must be a positive number, got {width!r}")
    if model in WIDTH_ARGUMENT:
        arguments[WIDTH_ARGUMENT[model]] = float(width)
    elif model in MNASNET_ALPHA:
        return MNASNET_ALPHA[model] * width
    elif width != 1.0:
        families = ", ".join([*WIDTH_ARGUMENT, *MNASNET_ALPHA])
        raise VisionModelError(
            f"{PREFIX}{model} has no width multiplier: width must be 1.0, got {width} (families with one: {families})"
        )
    return None


def _size_arguments(model: str, size: tuple[int, int]) -> dict:
    """The image size, for the constructors that need it."""
    if model.startswith("vit_"):
        if size[0] != size[1]:
            raise VisionModelError(f"{PREFIX}{model} takes square images only, got {size[0]}x{size[1]}")
        return {"image_size": size[0]}
    if model.startswith("maxvit_"):
        return {"input_size": size}
    return {}


def _replace_first_conv(model: str, network: nn.Module, in_channels: int) -> None:
    """Swap the first conv that reads 3 channels (the stem) for one reading `in_channels`, everything
    else alike (on the same device and dtype, freshly initialized)."""
    found = next(
        ((n, m) for n, m in network.named_modules() if type(m) is nn.Conv2d and m.in_channels == 3 and m.groups == 1),
        None,
    )
    if found is None:
        raise VisionModelError(f"{PREFIX}{model} has no conv reading 3 input channels to adapt to {in_channels}")
    name, conv = found
    stem = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    parent, _, attribute = name.rpartition(".")
    setattr(network.get_submodule(parent), attribute, stem)
