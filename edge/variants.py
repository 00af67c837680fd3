"""Variants as the edge holds them: what the portfolio says about one, and one made ready to serve.

`VariantInfo` is the portfolio's record of a variant (known whether or not it is in memory);
`LoadedVariant` is a variant in memory, its model as served with its spec and input normalization.
`loaded` makes one from a model rebuilt from its verified file. The runtime (`edge.runtime`) holds
and switches between them; the loading paths (`edge.loading`) build them. They live apart from the
runtime because both sides, and the benchmarks that load variants as an agent does, need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from common.inference import AS_LOADED, ServingPlan, as_planned, checked_for_inference
from common.variant import VariantSpec


@dataclass(frozen=True)
class VariantInfo:
    """What the portfolio says about a variant."""

    variant_id: str
    name: str
    accuracy: float
    size_bytes: int
    params: int


@dataclass(frozen=True)
class LoadedVariant:
    """A variant in memory, ready to serve: its model as served, its spec and input normalization."""

    info: VariantInfo
    model: nn.Module  # as served: as loaded, or optimized (see `loaded`)
    spec: VariantSpec
    mean: torch.Tensor  # [1, C, 1, 1]
    std: torch.Tensor
    plan: ServingPlan = AS_LOADED  # how it was made ready (`loaded`): a later load of it may skip the check

    @property
    def variant_id(self) -> str:
        return self.info.variant_id

    @property
    def memory_bytes(self) -> int:
        return model_bytes(self.model)


Loader = Callable[[], LoadedVariant]


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what holding it costs."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def loaded(
    info: VariantInfo,
    spec: VariantSpec,
    model: nn.Module,
    optimize: bool = True,
    rebuild: Callable[[], nn.Module] | None = None,
    plan: ServingPlan | None = None,
) -> LoadedVariant:
    """A variant ready to serve, with its normalization as broadcastable tensors: by default optimized
    (BatchNorm folded, channels-last: common.inference, which also says what `rebuild` is for), with
    `optimize=False` the model as loaded, in eval mode (`--no-optimize-models`). With the `plan` of an
    earlier load of the same verified bytes, it is made ready as that load's check decided, with no
    forward pass.

    Optimizing is the default because every variant serves faster that way, and a compact variant,
    whose small layers spend their time on memory passes more than on arithmetic, gains more than its
    sparse parent. The price is paid while a variant first loads (a checking forward pass in each
    form) and in a little resident memory for oneDNN's kernels per convolution shape; the figures are
    in docs/results.md."""
    channels = spec.input_shape[0]
    if not optimize:
        served, plan = model.eval(), AS_LOADED
    elif plan is not None:
        served = as_planned(model, plan)
    else:
        served, plan = checked_for_inference(model, tuple(spec.input_shape), rebuild)
    return LoadedVariant(
        info,
        served,
        spec,
        torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1),
        torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1),
        plan,
    )


def warm_up(variant: LoadedVariant, batch: int = 1) -> None:
    """One forward pass, so the first request does not pay for lazy initialization."""
    with torch.inference_mode():
        variant.model(torch.zeros(batch, *variant.spec.input_shape))
