"""`toy`: a real, tiny pruning method that lives in the tests, to show what adding a method takes.

It trains the dense model once with the build's recipe, then prunes that trained model one-shot by
global magnitude to each compression its settings ask for, masking the BatchNorm channels of filters
it empties, without retraining. This module and one registry entry (`METHODS["toy"] = METHOD`) are
all of it: its flag (`--toy-compressions`) and its place in `portfolio build` follow from the settings.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cloud.build.methods import masks as masking
from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.train import Masks, apply_masks, train
from common import datasets

DENSE_CHECKPOINT = "toy-dense.pt"  # in the build's work directory


@dataclass(frozen=True)
class ToySettings:
    """The settings of `toy`."""

    toy_compressions: tuple[float, ...] = field(
        default=(2.0, 4.0), metadata={"help": "compressions to prune the trained model to, one variant each"}
    )

    def __post_init__(self) -> None:
        if not self.toy_compressions or any(not c > 1 for c in self.toy_compressions):
            raise ValueError(f"toy compressions must be > 1, got {self.toy_compressions}")


def planned_compressions(settings: ToySettings) -> list[float]:
    return sorted(set(settings.toy_compressions))


def pruned(dense: nn.Module, compression: float, example: torch.Tensor) -> tuple[nn.Module, Masks]:
    """The trained dense model with all but 1/compression of its conv and linear weights zeroed by
    global magnitude (and the BatchNorm channels of emptied filters), as a new model."""
    masks = masking.prune_global_magnitude(dense, masking.dense_masks(dense), 1.0 - 1.0 / compression)
    masks = masking.with_batchnorm_masks(masks, masking.conv_batchnorm_pairs(dense, example))
    sparse = copy.deepcopy(dense)
    apply_masks(sparse, masks)
    return sparse.eval(), masks


def levels(context: BuildContext, settings: ToySettings) -> Iterator[SparseModel]:
    torch.manual_seed(context.config.seed)
    dense = context.new_model()
    data = context.data
    train(dense, data.info, data.train, context.config.train, checkpoint=context.work_dir / DENSE_CHECKPOINT)
    example = datasets.normalize(data.train.images[:1], data.info.mean, data.info.std)
    for level, compression in enumerate(planned_compressions(settings)):
        sparse, masks = pruned(dense, compression, example)
        yield SparseModel(level, sparse, masks, name=f"toy-{compression:g}x")


METHOD = Method(
    name="toy",
    help="one-shot global magnitude pruning of the trained dense model (a test method)",
    settings=ToySettings,
    levels=levels,
    planned_compressions=planned_compressions,
)
