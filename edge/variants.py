"""Variants as the edge holds them: what the portfolio says about one, and one made ready to serve.

`VariantInfo` is the portfolio's record of a member (known whether or not it is in memory);
`LoadedVariant` is a member in memory as a backend made it ready (`edge.backends`): what serves it
(a torch module, an ONNX Runtime session), its spec, its `forward` from pixels in [0, 1] to logits
(normalization included) and what holding it costs. The runtime (`edge.runtime`) holds and switches
between them without knowing which backend made them. They live apart from the runtime because both
sides, and the benchmarks that load variants as an agent does, need them.

This module imports no torch: the ONNX Runtime edge holds its variants in the same records. `loaded`
and `warm_up`, which make torch variants, are `edge.backends.torch_backend`'s, reachable here by name
for the callers that build torch variants directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.onnx_format import FLOAT32
from common.variant_spec import VariantSpec

TORCH_NAMES = ("loaded", "warm_up", "model_bytes")  # what `__getattr__` finds in the torch backend


@dataclass(frozen=True)
class VariantInfo:
    """What the portfolio says about a member; `size_bytes`: what holding it costs in memory as this
    edge's backend serves it (torch: its variant file's size; `Backend.held_bytes`), which the memory
    budget and the policy count before it is loaded."""

    variant_id: str
    name: str
    accuracy: float
    size_bytes: int
    params: int
    precision: str = FLOAT32


@dataclass(frozen=True, eq=False)
class LoadedVariant:
    """A member in memory, ready to serve. `forward` maps a float32 batch of pixels in [0, 1], [N, C, H, W],
    to float32 logits [N, classes]; `model` is what serves it (backend-specific: a torch module as
    served, an `edge.ort_model.OrtModel`), `mean` and `std` the backend's own form of the spec's
    normalization, `plan` how a torch variant was made ready (a later load may skip its check), and
    `memory_bytes` what holding it costs (the memory budget counts it)."""

    info: VariantInfo
    model: Any
    spec: VariantSpec
    forward: Callable[[np.ndarray], np.ndarray]
    memory_bytes: int
    mean: Any = None
    std: Any = None
    plan: Any = None
    backend: str = ""

    @property
    def variant_id(self) -> str:
        return self.info.variant_id


Loader = Callable[[], LoadedVariant]


def __getattr__(name: str):
    """`loaded`, `warm_up` and `model_bytes` of the torch backend, imported only when asked for."""
    if name in TORCH_NAMES:
        return getattr(importlib.import_module("edge.backends.torch_backend"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
