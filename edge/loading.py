"""Loading on the edge, whatever the backend: a listed member as the edge records it, its on-device
profile, and budget-sized groups of arrivals. How a member is built from its file is its backend's
(`edge.backends`); `cache_loader`, the torch backend's, is reachable here by name for its callers.
This module imports no torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from common.files import short_id
from common.onnx_format import FLOAT32
from common.profiling import LatencyProfile
from edge.variants import VariantInfo
from protos import coordinator_pb2


@dataclass(frozen=True)
class Profile:
    """A variant's latency on this device, at batch 1 and at the typical batch."""

    variant_id: str
    b1: LatencyProfile
    batch: LatencyProfile

    def to_proto(self) -> coordinator_pb2.VariantProfile:
        return coordinator_pb2.VariantProfile(
            variant_id=self.variant_id,
            p50_ms_b1=self.b1.p50_ms,
            p95_ms_b1=self.b1.p95_ms,
            batch=self.batch.batch,
            p50_ms_batch=self.batch.p50_ms,
            p95_ms_batch=self.batch.p95_ms,
        )


def variant_info(info, size_bytes: int | None = None) -> VariantInfo:
    """From a portfolio_pb2.VariantInfo; `size_bytes`: what holding it costs as this edge's backend
    serves it (`Backend.held_bytes`; default: the size of the member's own file)."""
    return VariantInfo(
        info.variant_id,
        info.name or short_id(info.variant_id),
        info.accuracy,
        info.size_bytes if size_bytes is None else size_bytes,
        info.params,
        info.precision or FLOAT32,
    )


def __getattr__(name: str):
    """`cache_loader` of the torch backend (`edge.backends.torch_backend`), imported only when asked for."""
    if name == "cache_loader":
        return importlib.import_module("edge.backends.torch_backend").cache_loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def budget_groups(fetched: list[tuple], budget_bytes: int) -> list[list[tuple]]:
    """Fetched variants ((info, ...) tuples) to load and profile together: all at once, or as many as
    the memory budget holds (at least one per group)."""
    groups, size = [[]], 0
    for item in fetched:
        if budget_bytes and groups[-1] and size + item[0].size_bytes > budget_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[0].size_bytes
    return [group for group in groups if group]
