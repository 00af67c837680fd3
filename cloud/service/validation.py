"""What the coordinator accepts from operators and edges: policies (unset fields filled and every range
checked, by the policy contract the edges apply too) and telemetry windows (a rollout is judged on them)."""

from __future__ import annotations

import math

from common import policy_contract as contract
from common.policy_contract import PolicyContractError
from protos import coordinator_pb2

DEFAULT_POLICY = coordinator_pb2.Policy(**contract.defaults(), version=1)


class PolicyError(PolicyContractError):
    """A policy that cannot be applied; the message names the field."""


def validate_policy(policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
    """Fill unset fields and check every range, both as the policy contract says (`common.policy_contract`),
    the same rules every edge applies to what it is sent. Returns a new policy; `version` is kept."""
    values = contract.filled(policy)
    found = contract.problem(values)
    if found is not None:
        raise PolicyError(found)
    merged = coordinator_pb2.Policy()
    merged.CopyFrom(policy)
    for name, value in values.items():
        setattr(merged, name, value)
    return merged


def telemetry_problem(telemetry: coordinator_pb2.Telemetry) -> str | None:
    """What makes a telemetry window unusable (a rollout is judged on these), or None."""
    t = telemetry
    if not all(math.isfinite(v) for v in (t.timestamp, t.request_rate, t.p50_ms, t.p95_ms, t.p99_ms, t.cpu_percent)):
        return "telemetry timestamp, request_rate, latencies and cpu_percent must be finite"
    if min(t.requests, t.errors, t.rss_bytes, t.resident_variants) < 0:
        return "telemetry requests, errors, rss_bytes and resident_variants must be >= 0"
    return None
