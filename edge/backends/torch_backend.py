"""The torch backend: float32 variant files (`.safetensors`) rebuilt into torch modules and served by
eager PyTorch, optimized for this CPU unless told not to. int8 members are ONNX files only: it leaves
them out.

`loaded` makes a `LoadedVariant` of a rebuilt model (`common.inference`: BatchNorm folded,
channels-last, checked against the model as loaded); `cache_loader` makes one from the verified cache,
on arrival and again on demand. Both are reachable as `edge.variants.loaded` and
`edge.loading.cache_loader` too, for the callers that build torch variants directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import models, variant
from common.inference import AS_LOADED, ServingPlan, as_planned, checked_for_inference
from common.onnx_format import INT8
from common.variant import VariantSpec
from edge.backends.base import Artifact, BackendSettings, precision
from edge.variants import LoadedVariant, VariantInfo

NAME = "torch"


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers: what holding it costs."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _forward(model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
    def forward(unit: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model((torch.from_numpy(unit) - mean) / std)
        return logits.numpy().astype(np.float32, copy=False)

    return forward


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
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1)
    return LoadedVariant(
        info, served, spec, _forward(served, mean, std), model_bytes(served), mean, std, plan, backend=NAME
    )


def warm_up(ready: LoadedVariant, batch: int = 1) -> None:
    """One forward pass, so the first request does not pay for lazy initialization."""
    ready.forward(np.zeros((batch, *ready.spec.input_shape), dtype=np.float32))


def cache_loader(
    info: VariantInfo, path: Path, allowed_models: tuple[str, ...] = (), optimize: bool = True
) -> Callable[[], LoadedVariant]:
    """How to build a variant from its verified file in the cache (on arrival, and again on demand):
    read, check the sha256 against its id, rebuild, optimize unless told not to (see `loaded`).

    The first load checks the model with forward passes (its shapes; the optimized model against the
    model as loaded) and warms it up. A later load of the same bytes skips the passes: it is made
    ready as the first load's check decided. So an on-demand load during a switch holds little beyond
    the variant's own bytes (the passes' scratch for activations can exceed what the smallest variants
    hold) and takes less time than the first. Its first request costs little more than the next:
    oneDNN keeps the kernels the first load made for those shapes. The figures are in docs/results.md."""
    plan = None

    def read(check: bool = True):
        return variant.load(path, expected_sha256=info.variant_id, allowed_models=allowed_models, check=check)

    def load() -> LoadedVariant:
        nonlocal plan
        held = read(check=plan is None)
        ready = loaded(info, held.spec, held.model, optimize, rebuild=lambda: read().model, plan=plan)
        if plan is None:
            warm_up(ready)
            plan = ready.plan
        return ready

    return load


def start(threads: int) -> None:
    """torch's intra-op threads for this process."""
    torch.set_num_threads(threads)


def allowed(entries) -> tuple[str, ...]:
    """The import-path architectures this edge may build (`common.models.parse_allow_list`)."""
    return models.parse_allow_list(entries)


class TorchBackend:
    """Serves float32 variant files with torch, on `settings.threads` threads."""

    name = NAME

    def __init__(self, settings: BackendSettings):
        self.settings = settings

    def artifact(self, info) -> Artifact | str:
        if precision(info) == INT8:
            return "an int8 member is an ONNX file only; the torch backend serves variant files"
        return Artifact(info.variant_id, info.size_bytes, info.signature, ".safetensors")

    def held_bytes(self, artifact: Artifact) -> int:
        """The variant file's size: its tensors and a small header, what the model's parameters and
        buffers take once loaded (folding BatchNorm only shrinks them)."""
        return artifact.size_bytes

    def loader(self, info: VariantInfo, artifact: Artifact, path: Path) -> Callable[[], LoadedVariant]:
        return cache_loader(info, path, self.settings.allowed_models, self.settings.optimize_models)
