"""Prometheus metrics of one agent, on a registry passed in (never the global one).

Every series carries the agent's name as the label `edge` (this client has no constant labels);
`variant` labels hold the variant id's short form (`common.files.short_id`), and `reason` the
low-cardinality reason code of a switch.

The request duration histogram has a bucket at the SLO. Bucket bounds are fixed once a histogram
exists, so when the policy sets an SLO that no bucket marks, the histogram is registered again with
the bucket added (every SLO seen keeps its bucket); its series restart from zero, which `rate()` and
`histogram_quantile()` treat as a counter reset.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)

from common.files import short_id

BASE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)
SWITCH_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def short(variant_id: str) -> str:
    return short_id(variant_id) or "none"


def latency_buckets(slo_s: float, base: tuple[float, ...] = BASE_BUCKETS) -> tuple[float, ...]:
    """The base buckets plus one at the SLO."""
    if slo_s <= 0:
        raise ValueError("slo_s must be positive")
    return tuple(sorted(set(base) | {round(slo_s, 6)}))


def _request_histogram(registry: CollectorRegistry, buckets: tuple[float, ...]) -> Histogram:
    return Histogram(
        "prunefleet_edge_request_duration_seconds",
        "Predict latency, from arrival to answer, by variant",
        ["edge", "variant"],
        buckets=buckets,
        registry=registry,
    )


def _add_process_collectors(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
    ProcessCollector(namespace="prunefleet_edge", registry=registry)  # the same, under the project's prefix
    GCCollector(registry=registry)  # python_gc_collections_total by generation: a full one pauses every request


class EdgeMetrics:
    """Every series of one agent, in groups: serving (requests, latency, the active variant, batches,
    the SLO), switching, and memory (loads, resident variants, evictions, the budget)."""

    def __init__(self, registry: CollectorRegistry, edge: str, slo_s: float):
        self._edge, self._registry = edge, registry
        self._histogram_lock = threading.Lock()
        self._bounds = latency_buckets(slo_s)
        self._add_serving(registry)
        self._add_switching(registry)
        self._add_memory(registry)
        self._slo_seconds.labels(edge).set(slo_s)
        for series in (self._evictions, self._on_demand_seconds, self._resident_variants, self._budget_bytes):
            series.labels(edge)  # present (at 0) before the first event, so queries never come back empty
        for source in ("arrival", "on_demand"):
            self._loads.labels(edge, source)
        _add_process_collectors(registry)

    def _add_serving(self, registry: CollectorRegistry) -> None:
        self._request_seconds = _request_histogram(registry, self._bounds)
        self._requests = Counter(
            "prunefleet_edge_requests_total",
            "Predict requests by variant and status code",
            ["edge", "variant", "code"],
            registry=registry,
        )
        self._active = Gauge(
            "prunefleet_edge_active_variant",
            "1 for the variant being served, else 0",
            ["edge", "variant"],
            registry=registry,
        )
        self._batch_size = Histogram(
            "prunefleet_edge_batch_size",
            "Requests run together by the micro-batcher",
            ["edge"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self._slo_seconds = Gauge(
            "prunefleet_edge_slo_seconds", "The p95 latency objective in force", ["edge"], registry=registry
        )

    def _add_switching(self, registry: CollectorRegistry) -> None:
        self._switches = Counter(
            "prunefleet_edge_switches_total", "Variant switches by reason code", ["edge", "reason"], registry=registry
        )
        self._switch_seconds = Histogram(
            "prunefleet_edge_switch_duration_seconds",
            "Time a variant switch takes (the reference swap)",
            ["edge"],
            buckets=SWITCH_BUCKETS,
            registry=registry,
        )
        self._on_demand_seconds = Histogram(
            "prunefleet_edge_on_demand_load_seconds",
            "Time a switch spent loading a variant that was not resident",
            ["edge"],
            buckets=LOAD_BUCKETS,
            registry=registry,
        )

    def _add_memory(self, registry: CollectorRegistry) -> None:
        self._load_seconds = Gauge(
            "prunefleet_edge_variant_load_seconds",
            "Time the last load of a variant took (on arrival: fetch, verify, build; "
            "on demand: read from the cache, verify, build)",
            ["edge", "variant"],
            registry=registry,
        )
        self._loads = Counter(
            "prunefleet_edge_variant_loads_total",
            "Variant loads, on arrival or on demand",
            ["edge", "source"],
            registry=registry,
        )
        self._resident_bytes = Gauge(
            "prunefleet_edge_resident_bytes",
            "Bytes of the parameters and buffers of the variants held in memory",
            ["edge"],
            registry=registry,
        )
        self._resident_variants = Gauge(
            "prunefleet_edge_resident_variants", "Variants held in memory", ["edge"], registry=registry
        )
        self._evictions = Counter(
            "prunefleet_edge_evictions_total",
            "Variants dropped from memory to stay within the memory budget",
            ["edge"],
            registry=registry,
        )
        self._budget_bytes = Gauge(
            "prunefleet_edge_memory_budget_bytes",
            "The memory budget for resident variants (0: none)",
            ["edge"],
            registry=registry,
        )
        self._left_out = Gauge(
            "prunefleet_edge_members_left_out",
            "Members of the portfolio last named that this edge's backend cannot serve (never offered to the policy)",
            ["edge", "backend"],
            registry=registry,
        )

    def request(self, variant_id: str, code: str, seconds: float | None) -> None:
        """One Predict outcome; latencies are observed for answered requests only."""
        self._requests.labels(self._edge, short(variant_id), code).inc()
        if seconds is not None:
            self._request_seconds.labels(self._edge, short(variant_id)).observe(seconds)

    def batched(self, requests: int) -> None:
        self._batch_size.labels(self._edge).observe(requests)

    def switched(self, reason_code: str, seconds: float, variant_ids: Iterable[str], active: str) -> None:
        self._switches.labels(self._edge, reason_code).inc()
        self._switch_seconds.labels(self._edge).observe(seconds)
        self.set_active(variant_ids, active)

    def set_active(self, variant_ids: Iterable[str], active: str) -> None:
        for variant_id in variant_ids:
            self._active.labels(self._edge, short(variant_id)).set(1 if variant_id == active else 0)

    def loaded(self, variant_id: str, seconds: float, resident_bytes: int, source: str = "arrival") -> None:
        """A variant was built: on `arrival` (fetched) or `on_demand` (from the cache, for a switch)."""
        self._load_seconds.labels(self._edge, short(variant_id)).set(seconds)
        self._loads.labels(self._edge, source).inc()
        if source == "on_demand":
            self._on_demand_seconds.labels(self._edge).observe(seconds)
        self._resident_bytes.labels(self._edge).set(resident_bytes)

    def memory(self, resident: Mapping, resident_bytes: int, evictions: int) -> None:
        self._resident_bytes.labels(self._edge).set(resident_bytes)
        self._resident_variants.labels(self._edge).set(len(resident))
        if evictions:
            self._evictions.labels(self._edge).inc(evictions)

    def left_out(self, backend: str, members: int) -> None:
        """How many members of the portfolio last named the backend leaves out."""
        self._left_out.labels(self._edge, backend).set(members)

    def budget(self, budget_bytes: int) -> None:
        self._budget_bytes.labels(self._edge).set(budget_bytes)

    def evicted(self, variant_id: str, resident_bytes: int) -> None:
        for gauge in (self._load_seconds, self._active):
            try:
                gauge.remove(self._edge, short(variant_id))
            except KeyError:
                pass
        self._resident_bytes.labels(self._edge).set(resident_bytes)

    def slo(self, seconds: float) -> None:
        """The SLO in force; the request histogram gains a bucket at it if it has none."""
        self._slo_seconds.labels(self._edge).set(seconds)
        with self._histogram_lock:
            if round(seconds, 6) in self._bounds:
                return
            self._bounds = latency_buckets(seconds, self._bounds)
            self._registry.unregister(self._request_seconds)
            self._request_seconds = _request_histogram(self._registry, self._bounds)
