"""Prometheus metrics of one agent, on a registry passed in (never the global one).

Every series carries the agent's `edge` label; `variant` labels hold the first 12 hex digits of the id.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

BASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def short(variant_id: str) -> str:
    return variant_id[:12] or "none"


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry, edge: str, slo_s: float):
        self.edge = edge
        buckets = tuple(sorted(set(BASE_BUCKETS) | {round(slo_s, 6)}))
        self._request_seconds = Histogram(
            "prunefleet_edge_request_duration_seconds", "Predict latency, from arrival to answer, by variant",
            ["edge", "variant"], buckets=buckets, registry=registry)
        self._requests = Counter("prunefleet_edge_requests_total", "Predict requests by variant and status code",
                                 ["edge", "variant", "code"], registry=registry)
        self._active = Gauge("prunefleet_edge_active_variant", "1 for the variant being served, else 0",
                             ["edge", "variant"], registry=registry)
        self._switches = Counter("prunefleet_edge_switches_total", "Variant switches by reason",
                                 ["edge", "reason"], registry=registry)
        self._switch_seconds = Histogram("prunefleet_edge_switch_duration_seconds", "Time a switch holds the lock",
                                         ["edge"], buckets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), registry=registry)
        self._load_seconds = Gauge("prunefleet_edge_variant_load_seconds",
                                   "Time to fetch, verify and build a variant", ["edge", "variant"], registry=registry)
        self._resident_bytes = Gauge("prunefleet_edge_resident_variant_bytes",
                                     "Bytes of variant files held in memory", ["edge"], registry=registry)
        self._slo_seconds = Gauge("prunefleet_edge_slo_seconds", "The p95 latency objective in force",
                                  ["edge"], registry=registry)
        ProcessCollector(registry=registry)

    def request(self, variant_id: str, code: str, seconds: float | None) -> None:
        self._requests.labels(self.edge, short(variant_id), code).inc()
        if seconds is not None:
            self._request_seconds.labels(self.edge, short(variant_id)).observe(seconds)

    def switched(self, reason_code: str, seconds: float, variant_ids: Iterable[str], active: str) -> None:
        self._switches.labels(self.edge, reason_code).inc()
        self._switch_seconds.labels(self.edge).observe(seconds)
        for variant_id in variant_ids:
            self._active.labels(self.edge, short(variant_id)).set(1 if variant_id == active else 0)

    def loaded(self, variant_id: str, seconds: float, resident_bytes: int) -> None:
        self._load_seconds.labels(self.edge, short(variant_id)).set(seconds)
        self._resident_bytes.labels(self.edge).set(resident_bytes)

    def slo(self, seconds: float) -> None:
        self._slo_seconds.labels(self.edge).set(seconds)
