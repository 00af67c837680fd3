"""`narrow`: a real, tiny test method whose models are compact already, as structured pruning's are.

Level 0 is the dense model: the build's architecture at the build's width. Each further level is the
same architecture at a fraction of that width, built through `common.models` (channels physically
fewer, nothing masked) and trained from its own seed with the build's recipe. The build stores each
as it was trained (`SparseModel.compact`, no surgery) and compares every variant with level 0
(`dense_level`), even when `--targets` leaves level 0 out of the portfolio.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.train import train
from common import models


def checkpoint(level: int) -> str:
    """Where level `level` keeps its training, in the build's work directory."""
    return f"narrow-{level}.pt"


@dataclass(frozen=True)
class NarrowSettings:
    """The settings of `narrow`."""

    narrow_fractions: tuple[float, ...] = field(
        default=(0.5,), metadata={"help": "widths of the levels after the dense one, as fractions of --width"}
    )

    def __post_init__(self) -> None:
        if not self.narrow_fractions or any(not 0 < f < 1 for f in self.narrow_fractions):
            raise ValueError(f"narrow fractions must be in (0, 1), got {self.narrow_fractions}")


def weights(model: nn.Module) -> int:
    """Conv and linear weights: what a compression counts."""
    return sum(layer.weight.numel() for layer in models.prunable_layers(model).values())


def planned_compressions(settings: NarrowSettings) -> list[float]:
    """Conv weights shrink with the square of the width (the classifier only linearly: an estimate)."""
    return [1.0, *(f**-2 for f in settings.narrow_fractions)]


def narrowed(context: BuildContext, fraction: float) -> nn.Module:
    """The build's architecture at `fraction` of the build's width, freshly initialized."""
    kwargs = context.model_kwargs()
    return models.build(context.config.model, {**kwargs, "width": kwargs["width"] * fraction})


def levels(context: BuildContext, settings: NarrowSettings) -> Iterator[SparseModel]:
    config, data = context.config, context.data
    dense_weights = 0
    for level, fraction in enumerate((1.0, *settings.narrow_fractions)):
        torch.manual_seed(config.seed + level)
        model = narrowed(context, fraction)
        train(model, data.info, data.train, config.train, checkpoint=context.work_dir / checkpoint(level))
        dense_weights = dense_weights or weights(model)
        compression = dense_weights / weights(model)
        yield SparseModel(level, model.eval(), {}, compression=compression, name=f"narrow-{fraction:g}", compact=True)


METHOD = Method(
    name="narrow",
    help="the architecture at narrower widths, each trained from scratch (a test method)",
    settings=NarrowSettings,
    levels=levels,
    planned_compressions=planned_compressions,
    dense_level=True,
)
