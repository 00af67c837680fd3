"""The portfolio's dense model: what its owner compares every variant with.

Where a method's level 0 is the dense model (`Method.dense_level`: shifter trains it, or takes the
user's `--weights` as it is), that level is the reference, kept even when `--targets` leaves it out
of the portfolio. Otherwise (reconvene prunes before any training, so it never trains a dense model)
the build trains the dense architecture itself from the build's seed with the build's recipe: the
dense model the same training budget buys. That run is resumable by its epoch checkpoint
(`work/dense-reference.pt`) and trains data-parallel under torchrun like any other; with
`--weights`, or `--reference-weights` for a method that prunes at initialization (a dense model
trained elsewhere, to compare with), the given model is the reference and nothing trains.

The reference is measured as a variant is: accuracy on the test split, params, MACs, and served as an
edge serves it (`common.inference.for_inference`), timed in the same interleaved rounds as the
variants (`cloud.build.timing.time_members`). Its weights are stored as a variant file
(`DenseEntry.variant_id`), which no listing names: it is there so that members added later
(`prunefleet portfolio quantize`) are timed in the same rounds as the dense model again.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from cloud.build import derive, distributed
from cloud.build.methods.base import BuildContext, SparseModel
from cloud.build.store import DenseEntry
from cloud.build.train import evaluate, train
from common import models, variant
from common.errors import PrunefleetError
from common.inference import for_inference
from common.profiling import count_macs

log = logging.getLogger(__name__)
CHECKPOINT = "dense-reference.pt"  # in the build's work directory


class DenseReferenceError(PrunefleetError, RuntimeError):
    """A method whose level 0 should be the dense model and is not (or is missing); names the method."""


@dataclass(frozen=True)
class Reference:
    """The dense model measured (its latencies still 0 until it is timed with the variants) and a copy
    of it as an edge serves it."""

    entry: DenseEntry
    served: nn.Module


def _spec(entry: DenseEntry, context: BuildContext) -> variant.VariantSpec:
    """The dense model's spec, as a level's would be (nothing run-dependent, so its id repeats)."""
    return derive.variant_spec(
        context,
        sparsity=0.0,
        accuracy=entry.accuracy,
        name=entry.name,
        level=entry.level or 0,
        extra={"dense_source": entry.source},
    )


def measure(
    model: nn.Module,
    context: BuildContext,
    source: str,
    *,
    trained_by_build: bool = False,
    epochs: int = 0,
    level: int | None = None,
    accuracy: float | None = None,
) -> Reference:
    """`model` measured on the CPU (its test accuracy unless already known) and stored as a variant
    file, then made ready to serve: `model` is taken over (serving folds its BatchNorm in place)."""
    config, data, shape = context.config, context.data, context.data.info.input_shape
    model = model.cpu().eval()
    entry = DenseEntry(
        name=f"{config.model}-dense",
        arch=config.model,
        params=models.count_params(model),
        macs=count_macs(model, shape),
        accuracy=evaluate(model, data.info, data.test) if accuracy is None else accuracy,
        source=source,
        trained_by_build=trained_by_build,
        epochs=epochs,
        level=level,
    )
    entry = replace(entry, variant_id=context.store.put_variant(variant.encode(model, _spec(entry, context))))
    return Reference(entry, for_inference(model, tuple(shape)))


def from_level(
    sparse: SparseModel, context: BuildContext, method: str, dense_params: int, accuracy: float | None = None
) -> Reference:
    """Level 0 of a method whose level 0 is the dense model, checked to be it (the dense architecture's
    parameters, nothing masked, no compression) and measured from a copy: the method's own model is
    left as it is, where it is, for the levels it derives from it."""
    params = models.count_params(sparse.model)
    masked = sum(int((~m.bool()).sum()) for m in sparse.masks.values())
    if sparse.level != 0 or params != dense_params or masked or sparse.compression not in (None, 1.0):
        raise DenseReferenceError(
            f"method {method} says its level 0 is the dense model, but level {sparse.level} has {params} params "
            f"(the architecture {dense_params}), {masked} weights masked and compression {sparse.compression}"
        )
    source = f"level 0 of {method}" + (" (the given --weights)" if context.config.weights else "")
    return measure(copy.deepcopy(sparse.model), context, source, level=0, accuracy=accuracy)


def trained(context: BuildContext) -> Reference | None:
    """For a method whose level 0 is no dense model: the given `--weights` or `--reference-weights`, or
    the dense architecture trained from the build's seed with its recipe (every torchrun process trains
    its shard; resumed from the checkpoint). Measured on rank 0, which gets the Reference; the other ranks get None."""
    config, data = context.config, context.data
    for path, flag in ((config.weights, "--weights"), (config.reference_weights, "--reference-weights")):
        given = context.trained_model(path) if path is not None else None
        if given is not None:
            return measure(given, context, f"the given {flag}") if distributed.is_main() else None
    epochs = config.train.epochs
    log.info(
        "training the dense %s to compare the variants with (%d epochs, seed %d)", config.model, epochs, config.seed
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = train(
            context.new_model(),
            data.info,
            data.train,
            config.train,
            checkpoint=context.work_dir / CHECKPOINT,
            desc="dense reference",
            device=context.device,
        )
    if not distributed.is_main():
        return None
    source = f"trained by the build from seed {config.seed}"
    return measure(model, context, source, trained_by_build=True, epochs=epochs)
