"""Loading on the edge: variants from the verified cache, their on-device profile, budget-sized groups."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import variant
from common.files import short_id
from common.profiling import LatencyProfile
from edge.variants import LoadedVariant, VariantInfo, loaded, warm_up
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


def variant_info(info) -> VariantInfo:
    """From a portfolio_pb2.VariantInfo."""
    return VariantInfo(
        info.variant_id, info.name or short_id(info.variant_id), info.accuracy, info.size_bytes, info.params
    )


def cache_loader(
    info: VariantInfo, path: Path, allowed_models: tuple[str, ...] = (), optimize: bool = True
) -> Callable[[], LoadedVariant]:
    """How to build a variant from its verified file in the cache (on arrival, and again on demand):
    read, check the sha256 against its id, rebuild, optimize unless told not to (see `edge.variants.loaded`).

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
