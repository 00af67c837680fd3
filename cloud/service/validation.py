"""What the coordinator accepts from operators and edges: policies (unset fields filled from the
defaults, every range checked) and telemetry windows (a rollout is judged on them)."""

from __future__ import annotations

import math

from common.errors import PrunefleetError
from protos import coordinator_pb2

DEFAULT_POLICY = coordinator_pb2.Policy(
    slo_ms=50.0,
    min_accuracy=0.0,
    down_windows=2,
    up_windows=3,
    up_headroom=0.7,
    dwell_s=5.0,
    window_s=1.0,
    version=1,
    max_switches_per_minute=6,
)
MIN_SLO_MS, MAX_SLO_MS = 0.001, 3.6e6  # 1 us to an hour: what an edge accepts (edge.policy)
ZERO_MEANS_DEFAULT = ("slo_ms", "down_windows", "up_windows", "up_headroom", "window_s", "max_switches_per_minute")


class PolicyError(PrunefleetError, ValueError):
    """A policy that cannot be applied; the message names the field."""


def validate_policy(policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
    """Fill unset fields from the defaults and check the ranges."""
    merged = coordinator_pb2.Policy()
    merged.CopyFrom(policy)
    for name in ZERO_MEANS_DEFAULT:
        if getattr(merged, name) == 0:
            setattr(merged, name, getattr(DEFAULT_POLICY, name))
    values = (merged.slo_ms, merged.min_accuracy, merged.up_headroom, merged.dwell_s, merged.window_s)
    checks = [
        (
            all(math.isfinite(v) for v in values),
            "slo_ms, min_accuracy, up_headroom, dwell_s and window_s must be finite",
        ),
        (MIN_SLO_MS <= merged.slo_ms <= MAX_SLO_MS, f"slo_ms must be in [{MIN_SLO_MS}, {MAX_SLO_MS:g}]"),
        (0 <= merged.min_accuracy <= 1, "min_accuracy must be in [0, 1]"),
        (merged.down_windows >= 1 and merged.up_windows >= 1, "down_windows and up_windows must be >= 1"),
        (0 < merged.up_headroom <= 1, "up_headroom must be in (0, 1]"),
        (merged.dwell_s >= 0, "dwell_s must be >= 0"),
        (0.1 <= merged.window_s <= 60, "window_s must be in [0.1, 60]"),
        (1 <= merged.max_switches_per_minute <= 600, "max_switches_per_minute must be in [1, 600]"),
    ]
    for ok, message in checks:
        if not ok:
            raise PolicyError(message)
    return merged


def telemetry_problem(telemetry: coordinator_pb2.Telemetry) -> str | None:
    """What makes a telemetry window unusable (a rollout is judged on these), or None."""
    t = telemetry
    if not all(math.isfinite(v) for v in (t.timestamp, t.request_rate, t.p50_ms, t.p95_ms, t.p99_ms, t.cpu_percent)):
        return "telemetry timestamp, request_rate, latencies and cpu_percent must be finite"
    if min(t.requests, t.errors, t.rss_bytes, t.resident_variants) < 0:
        return "telemetry requests, errors, rss_bytes and resident_variants must be >= 0"
    return None
