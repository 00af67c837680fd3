"""Variants from what a method yields: each made compact, proven equal to what the method trained,
stored as a variant file, then timed together with the portfolio's dense model.

A sparse model (the dense shape times its masks) goes through surgery (`cloud.build.compaction`),
which removes its dead channels and checks the compact copy against it. A compact model
(`SparseModel.compact`: channels removed by the method itself, then trained) is the variant already:
it is encoded, rebuilt from those bytes as an edge rebuilds it (`common.variant.load_bytes`), and the
rebuilt model is checked against the trained one on the check images and random inputs, so a model
its variant file cannot describe (a layer changed in a way no stored shape says) is refused, naming
the variant, before anything is published.

Once its variant file is stored, a variant gets its ONNX file (unless the build says `--no-onnx`) and,
with `--int8`, an int8 member (`cloud.build.artifacts`); all are timed together with the dense model
afterwards (`cloud.build.timing`).

Everything here runs on the CPU, where the edges run variants.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cloud.build.compaction import surgery
from cloud.build.methods.base import BuildContext, SparseModel
from cloud.build.methods.masks import sparsity as mask_sparsity
from cloud.build.store import VariantEntry
from cloud.build.timing import Member
from cloud.build.train import evaluate
from common import datasets, models, variant
from common.errors import PrunefleetError
from common.inference import for_inference
from common.profiling import count_macs

# A rebuilt compact model holds the very same weights in the same layers, so it computes the same
# floats: anything past float32 noise means the file describes another model.
REBUILD_ATOL = 1e-6
RANDOM_CHECKS = 16  # random inputs the rebuild check runs on, besides the real check images
_Derived = tuple[nn.Module, variant.VariantSpec, bytes, float]  # the variant's model, spec, file, max abs diff


class CompactModelError(PrunefleetError, RuntimeError):
    """A compact model that its variant file does not rebuild; the message names the variant."""


def check_images(context: BuildContext) -> torch.Tensor:
    """The real test images (normalized) every equivalence check of the build runs on."""
    data = context.data
    return datasets.normalize(datasets.head(data.test, context.config.check_images), data.info.mean, data.info.std)


def variant_spec(context: BuildContext, **fields) -> variant.VariantSpec:
    """The spec of a variant of this build: what the build says of every variant (architecture, input,
    classes, normalization, method) and `fields` (name, level, sparsity, accuracy, extra) of this one.
    Nothing run-dependent goes in, so ids repeat."""
    config, info = context.config, context.data.info
    return variant.VariantSpec(
        arch=config.model,
        kwargs=context.model_kwargs(),
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        method=config.method,
        classes=info.classes,
        **fields,
    )


def _spec(
    sparse: SparseModel, context: BuildContext, sparsity: float, accuracy: float, sparse_accuracy: float
) -> variant.VariantSpec:
    return variant_spec(
        context,
        sparsity=sparsity,
        accuracy=accuracy,
        name=sparse.name or f"{context.config.model}-L{sparse.level}",
        level=sparse.level,
        extra={"sparse_accuracy": sparse_accuracy},
    )


def rebuilt(encoded: bytes, trained: nn.Module, check: torch.Tensor, name: str, arch: str) -> tuple[nn.Module, float]:
    """The model `encoded` rebuilds, and its max abs difference from `trained` on `check` and
    RANDOM_CHECKS random inputs; CompactModelError naming `name` when it cannot be rebuilt or differs."""
    try:
        model = variant.load_bytes(encoded, allowed_models=(arch,)).model
    except variant.VariantError as err:
        raise CompactModelError(f"compact model {name}: its variant file does not rebuild it: {err}") from err
    noise = torch.randn(RANDOM_CHECKS, *check.shape[1:], generator=torch.Generator().manual_seed(0))
    diff, trained = 0.0, trained.eval()
    with torch.inference_mode():
        for x in torch.cat([noise, check]).split(256):
            got, want = model(x), trained(x)
            if got.shape != want.shape:
                raise CompactModelError(
                    f"compact model {name}: rebuilt from its variant file it outputs {tuple(got.shape)}, "
                    f"trained {tuple(want.shape)}"
                )
            diff = max(diff, float((got - want).abs().max()))
    if not diff <= REBUILD_ATOL:
        raise CompactModelError(
            f"compact model {name}: rebuilt from its variant file it differs from the trained model by {diff:.3g} "
            f"(max abs diff, at most {REBUILD_ATOL:g} allowed): a layer differs in what no stored shape says"
        )
    return model, diff


def _as_trained(sparse: SparseModel, context: BuildContext, check: torch.Tensor) -> _Derived:
    """A compact model rebuilt from its variant file (checked equal), the file, and their max abs diff."""
    info, test = context.data.info, context.data.test
    accuracy = evaluate(sparse.model, info, test)
    spec = _spec(sparse, context, 1.0 - 1.0 / sparse.compression, accuracy, accuracy)
    encoded = variant.encode(sparse.model, spec)
    model, diff = rebuilt(encoded, sparse.model, check, spec.name, context.config.model)
    again = evaluate(model, info, test)
    if again != accuracy:
        raise CompactModelError(
            f"compact model {spec.name}: rebuilt from its variant file it scores {again:.4f} on the test split, "
            f"trained {accuracy:.4f}"
        )
    return model, spec, encoded, diff


def _by_surgery(sparse: SparseModel, context: BuildContext, check: torch.Tensor) -> _Derived:
    """A sparse model made compact by surgery (checked equal), its variant file and their max abs diff."""
    info, test = context.data.info, context.data.test
    compact, report = surgery.compact(sparse.model, check[:1], check_inputs=check)
    sparsity = mask_sparsity(sparse.masks) if sparse.compression is None else 1.0 - 1.0 / sparse.compression
    spec = _spec(sparse, context, sparsity, evaluate(compact, info, test), evaluate(sparse.model, info, test))
    return compact, spec, variant.encode(compact, spec), report.max_abs_diff


def derive_variant(sparse: SparseModel, context: BuildContext, dense_params: int) -> list[Member]:
    """One level as a stored variant: compacted by surgery, or a compact model checked against its own
    file; measured and stored, with its ONNX file and its int8 member when the build makes them.
    Returns the members to time (latencies left at 0), the variant first, served as an edge serves it
    by default."""
    store = context.store
    sparse.model.cpu()  # surgery, the checks and the measurements run where the edges run variants
    derive = _as_trained if sparse.compact else _by_surgery
    check = check_images(context)
    compact, spec, encoded, diff = derive(sparse, context, check)
    variant_id = store.put_variant(encoded)
    params, shape = models.count_params(compact), context.data.info.input_shape
    entry = VariantEntry(
        variant_id=variant_id,
        name=spec.name,
        level=sparse.level,
        method=context.config.method,
        arch=context.config.model,
        params=params,
        size_bytes=len(encoded),
        accuracy=spec.accuracy,
        sparse_accuracy=spec.extra["sparse_accuracy"],
        sparsity=spec.sparsity,
        compression=1.0 / max(1e-12, 1.0 - spec.sparsity),
        params_ratio=dense_params / params,
        latency_ms_b1=0.0,
        latency_ms_b32=0.0,
        max_abs_diff=diff,
        macs=count_macs(compact, shape),
        sparse_params=models.count_params(sparse.model),
    )
    served = for_inference(copy.deepcopy(compact), tuple(shape))  # timed as an edge serves it by default
    if not context.config.onnx:
        return [Member(entry, served)]
    from cloud.build import artifacts  # needs the onnx extra, which BuildConfig checked is installed

    return artifacts.build_members(entry, compact, spec, served, context, check)
