"""Operator commands: talk to a running cloud over gRPC and print tables."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from cloud.store import Manifest
from common.wire import GRPC_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2, portfolio_pb2_grpc

RPC_TIMEOUT_S = 10.0
STALE_AFTER_S = 5.0


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def portfolio_table(manifest: Manifest) -> str:
    rows = [(v.name, v.variant_id[:12], f"{100 * v.sparsity:.1f}%", f"{v.params:,}", f"{v.params_ratio:.2f}x",
             f"{v.size_bytes / 1024:.0f} KiB", f"{100 * v.accuracy:.2f}%", f"{100 * v.sparse_accuracy:.2f}%",
             f"{v.latency_ms_b1:.2f}", f"{v.latency_ms_b32:.2f}") for v in manifest.variants]
    return table(("variant", "id", "sparsity", "params", "smaller", "file", "accuracy", "sparse acc",
                  "ms@b1", "ms@b32"), rows)


def coordinator_stub(address: str) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(address, options=GRPC_OPTIONS))


def fleet_table(fleet: coordinator_pb2.GetFleetResponse, names: dict[str, str], now: float) -> str:
    rows = []
    for edge in fleet.edges:
        t = edge.telemetry
        age = now - edge.last_seen
        state = "live" if edge.connected and age < STALE_AFTER_S else ("stale" if edge.last_seen else "new")
        rows.append((edge.edge, state, names.get(t.active_variant, t.active_variant[:12]) or "-",
                     f"{t.p95_ms:.1f}", f"{t.request_rate:.1f}", f"{t.cpu_percent:.0f}%",
                     f"{t.rss_bytes / 2**20:.0f} MiB", f"v{edge.policy_version}", f"{age:.1f}s ago"))
    header = (f"portfolio {fleet.portfolio_id}  policy v{fleet.policy.version}: SLO p95 <= "
              f"{fleet.policy.slo_ms:.1f} ms\n")
    return header + table(("edge", "state", "active", "p95 ms", "req/s", "cpu", "rss", "policy", "last seen"), rows)


def variant_names(address: str) -> dict[str, str]:
    stub = portfolio_pb2_grpc.PortfolioServiceStub(grpc.insecure_channel(address, options=GRPC_OPTIONS))
    reply = stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_TIMEOUT_S)
    return {v.variant_id: v.name for v in reply.variants}


def fleet_status(address: str) -> str:
    fleet = coordinator_stub(address).GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_TIMEOUT_S)
    return fleet_table(fleet, variant_names(address), time.time())


def set_policy(address: str, **changes) -> coordinator_pb2.Policy:
    """Start from the coordinator's current policy and change only the given fields."""
    stub = coordinator_stub(address)
    policy = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_TIMEOUT_S).policy
    for name, value in changes.items():
        if value is not None:
            setattr(policy, name, value)
    return stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=policy), timeout=RPC_TIMEOUT_S).policy


def events_table(address: str, edge: str = "", limit: int = 100) -> str:
    reply = coordinator_stub(address).ListEvents(coordinator_pb2.ListEventsRequest(edge=edge, limit=limit),
                                                 timeout=RPC_TIMEOUT_S)
    rows = [(time.strftime("%H:%M:%S", time.localtime(e.event.timestamp)), e.edge, e.event.reason_code,
             e.event.from_variant[:12] or "-", e.event.to_variant[:12] if e.event.switched else "(stays)",
             f"{e.event.observed_p95_ms:.1f}", f"{e.event.request_rate:.1f}", f"{e.event.predicted_p95_ms:.1f}",
             f"{e.event.slo_ms:.1f}", f"v{e.event.policy_version}", f"{e.event.switch_us:.0f}",
             f"{e.event.load_ms:.1f}", e.event.reason) for e in reply.events]
    return table(("time", "edge", "decision", "from", "to", "p95 ms", "req/s", "predicted ms", "slo ms", "policy",
                  "switch us", "load ms", "reason"), rows)
