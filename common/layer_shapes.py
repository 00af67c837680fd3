"""Layer attributes that follow the channel count, set again from a layer's (resized) tensors.

A variant file stores tensors only; the reader builds the base architecture and resizes each tensor
to its stored shape (`common.variant.build_model`). The attributes a layer's forward reads besides
its tensors must follow: `sync` sets them for the layers of the zoo's and torchvision's
classification networks (linear layers, BatchNorm and InstanceNorm, GroupNorm, LayerNorm and
torchvision's LayerNorm2d, PReLU). Convolutions, whose groups need judging, are the variant file's own
(`common.variant`). A layer without tensors to read keeps its attributes.
"""

from __future__ import annotations

from torch import nn

from common.errors import PrunefleetError


class LayerShapeError(PrunefleetError, ValueError):
    """Stored tensors that no setting of a layer's attributes fits."""


def _stored(*tensors) -> tuple[int, ...] | None:
    shape = next((tuple(t.shape) for t in tensors if t is not None), None)
    if shape is not None and any(t is not None and tuple(t.shape) != shape for t in tensors):
        raise LayerShapeError(
            f"the layer's tensors disagree in shape: {[tuple(t.shape) for t in tensors if t is not None]}"
        )
    return shape


def _sync_group_norm(name: str, norm: nn.GroupNorm) -> None:
    shape = _stored(norm.weight, norm.bias)
    if shape is None:
        return
    if len(shape) != 1 or shape[0] % norm.num_groups:
        raise LayerShapeError(f"group norm {name!r} has {norm.num_groups} groups, which do not divide {shape}")
    norm.num_channels = shape[0]


def sync(name: str, module: nn.Module) -> None:
    """Set `module`'s channel-count attributes from its tensors (a no-op for other layers)."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        shape = _stored(module.weight, module.bias, module.running_mean, module.running_var)
        if shape is not None:
            (module.num_features,) = shape
    elif isinstance(module, nn.GroupNorm):
        _sync_group_norm(name, module)
    elif isinstance(module, nn.LayerNorm):  # torchvision's LayerNorm2d too
        shape = _stored(module.weight, module.bias)
        if shape is not None:
            module.normalized_shape = shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
