"""Prometheus metrics of one agent, on a registry passed in (never the global one).

Every series carries the agent's name as the label `edge` (this client has no constant labels); `variant` labels hold the first
12 hex digits of the variant id, and `reason` the low-cardinality reason code of a switch.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

BASE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.25, 0.5, 1.0, 2.5)
SWITCH_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2)


def short(variant_id: str) -> str:
    return variant_id[:12] or "none"


def latency_buckets(slo_s: float) -> tuple[float, ...]:
    """The base buckets plus one at the SLO."""
    if slo_s <= 0:
        raise ValueError("slo_s must be positive")
    return tuple(sorted(set(BASE_BUCKETS) | {round(slo_s, 6)}))


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry, edge: str, slo_s: float):
        self._edge = edge
        self._request_seconds = Histogram(
            "prunefleet_edge_request_duration_seconds", "Predict latency, from arrival to answer, by variant",
            ["edge", "variant"], buckets=latency_buckets(slo_s), registry=registry)
        self._requests = Counter("prunefleet_edge_requests_total", "Predict requests by variant and status code",
                                 ["edge", "variant", "code"], registry=registry)
        self._active = Gauge("prunefleet_edge_active_variant", "1 for the variant being served, else 0",
                             ["edge", "variant"], registry=registry)
        self._switches = Counter("prunefleet_edge_switches_total", "Variant switches by reason code",
                                 ["edge", "reason"], registry=registry)
        self._switch_seconds = Histogram("prunefleet_edge_switch_duration_seconds",
                                         "Time a variant switch takes (the reference swap)",
                                         ["edge"], buckets=SWITCH_BUCKETS, registry=registry)
        self._load_seconds = Gauge("prunefleet_edge_variant_load_seconds",
                                   "Time to fetch, verify and build a variant", ["edge", "variant"],
                                   registry=registry)
        self._resident_bytes = Gauge("prunefleet_edge_resident_bytes", "Bytes of variant files held in memory",
                                     ["edge"], registry=registry)
        self._slo_seconds = Gauge("prunefleet_edge_slo_seconds", "The p95 latency objective in force",
                                  ["edge"], registry=registry)
        self._slo_seconds.labels(edge).set(slo_s)
        ProcessCollector(registry=registry)

    def request(self, variant_id: str, code: str, seconds: float | None) -> None:
        """One Predict outcome; latencies are observed for answered requests only."""
        self._requests.labels(self._edge, short(variant_id), code).inc()
        if seconds is not None:
            self._request_seconds.labels(self._edge, short(variant_id)).observe(seconds)

    def switched(self, reason_code: str, seconds: float, variant_ids: Iterable[str], active: str) -> None:
        self._switches.labels(self._edge, reason_code).inc()
        self._switch_seconds.labels(self._edge).observe(seconds)
        self.set_active(variant_ids, active)

    def set_active(self, variant_ids: Iterable[str], active: str) -> None:
        for variant_id in variant_ids:
            self._active.labels(self._edge, short(variant_id)).set(1 if variant_id == active else 0)

    def loaded(self, variant_id: str, seconds: float, resident_bytes: int) -> None:
        self._load_seconds.labels(self._edge, short(variant_id)).set(seconds)
        self._resident_bytes.labels(self._edge).set(resident_bytes)

    def evicted(self, variant_id: str, resident_bytes: int) -> None:
        for gauge in (self._load_seconds, self._active):
            try:
                gauge.remove(self._edge, short(variant_id))
            except KeyError:
                pass
        self._resident_bytes.labels(self._edge).set(resident_bytes)

    def slo(self, seconds: float) -> None:
        self._slo_seconds.labels(self._edge).set(seconds)
