"""Operator commands: talk to a running cloud over gRPC and print tables."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cloud.build.store import Manifest
from common.files import short_id
from common.security import Transport
from protos import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)

RPC_TIMEOUT_S = 10.0
STALE_AFTER_S = 5.0


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def portfolio_table(manifest: Manifest) -> str:
    rows = [
        (
            v.name,
            short_id(v.variant_id),
            f"{100 * v.sparsity:.1f}%",
            f"{v.params:,}",
            f"{v.params_ratio:.2f}x",
            f"{v.size_bytes / 1024:.0f} KiB",
            f"{100 * v.accuracy:.2f}%",
            f"{100 * v.sparse_accuracy:.2f}%",
            f"{v.latency_ms_b1:.2f}",
            f"{v.latency_ms_b32:.2f}",
        )
        for v in manifest.variants
    ]
    return table(
        ("variant", "id", "sparsity", "params", "smaller", "file", "accuracy", "sparse acc", "ms@b1", "ms@b32"), rows
    )


def coordinator_stub(address: str, transport: Transport) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(transport.channel(address))


def edge_state(edge: coordinator_pb2.EdgeStatus, now: float) -> str:
    """live (connected and heard from lately), stale (known, not heard from lately: never forgotten), new."""
    if edge.connected and now - edge.last_seen < STALE_AFTER_S:
        return "live"
    return "stale" if edge.last_seen else "new"


def _desired_vs_reported(desired: str, reported: str) -> str:
    return f"{reported or '-'}" if desired == reported else f"{reported or '-'} -> {desired or '-'}"


def fleet_table(fleet: coordinator_pb2.GetFleetResponse, names: dict[str, str], now: float) -> str:
    """One row per edge; `portfolio` and `policy` show reported state, and `-> desired` where they differ."""
    rows = []
    for edge in fleet.edges:
        t = edge.telemetry
        rows.append(
            (
                edge.edge,
                edge_state(edge, now),
                names.get(t.active_variant, short_id(t.active_variant)) or "-",
                _desired_vs_reported(edge.desired_portfolio_id, edge.reported_portfolio_id),
                _desired_vs_reported(f"v{edge.desired_policy_version}", f"v{edge.policy_version}"),
                names.get(edge.pinned_variant, short_id(edge.pinned_variant)) or "-",
                f"{t.p95_ms:.1f}",
                f"{t.request_rate:.1f}",
                f"{t.cpu_percent:.0f}%",
                f"{t.rss_bytes / 2**20:.0f} MiB",
                f"{now - edge.last_seen:.1f}s ago",
            )
        )
    header = (
        f"portfolio {fleet.portfolio_id}  policy v{fleet.policy.version}: SLO p95 <= {fleet.policy.slo_ms:.1f} ms\n"
    )
    return header + table(
        ("edge", "state", "active", "portfolio", "policy", "pin", "p95 ms", "req/s", "cpu", "rss", "last seen"), rows
    )


def variant_names(address: str, transport: Transport) -> dict[str, str]:
    stub = portfolio_pb2_grpc.PortfolioServiceStub(transport.channel(address))
    reply = stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_TIMEOUT_S)
    return {v.variant_id: v.name for v in reply.variants}


def fleet_status(address: str, transport: Transport) -> str:
    fleet = coordinator_stub(address, transport).GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_TIMEOUT_S)
    return fleet_table(fleet, variant_names(address, transport), time.time())


def set_policy(address: str, transport: Transport, **changes) -> coordinator_pb2.Policy:
    """Start from the coordinator's current policy and change only the given fields."""
    stub = coordinator_stub(address, transport)
    policy = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_TIMEOUT_S).policy
    for name, value in changes.items():
        if value is not None:
            setattr(policy, name, value)
    return stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=policy), timeout=RPC_TIMEOUT_S).policy


def events_table(address: str, transport: Transport, edge: str = "", limit: int = 100) -> str:
    reply = coordinator_stub(address, transport).ListEvents(
        coordinator_pb2.ListEventsRequest(edge=edge, limit=limit), timeout=RPC_TIMEOUT_S
    )
    rows = [
        (
            time.strftime("%H:%M:%S", time.localtime(e.event.timestamp)),
            e.edge,
            e.event.reason_code,
            short_id(e.event.from_variant) or "-",
            short_id(e.event.to_variant) if e.event.switched else "(stays)",
            f"{e.event.observed_p95_ms:.1f}",
            f"{e.event.request_rate:.1f}",
            f"{e.event.predicted_p95_ms:.1f}",
            f"{e.event.slo_ms:.1f}",
            f"v{e.event.policy_version}",
            f"{e.event.switch_us:.0f}",
            f"{e.event.load_ms:.1f}",
            e.event.reason,
        )
        for e in reply.events
    ]
    return table(
        (
            "time",
            "edge",
            "decision",
            "from",
            "to",
            "p95 ms",
            "req/s",
            "predicted ms",
            "slo ms",
            "policy",
            "switch us",
            "load ms",
            "reason",
        ),
        rows,
    )


def rollout_line(rollout: coordinator_pb2.Rollout) -> str:
    return (
        f"rollout {rollout.id} of portfolio {rollout.portfolio_id} to {len(rollout.edges)} edge(s) "
        f"(canary {', '.join(rollout.canary_edges)}): {rollout.state}: {rollout.reason}"
    )


def deploy(
    address: str,
    transport: Transport,
    portfolio: str,
    edges: str = "",
    canary: int = 1,
    thresholds: coordinator_pb2.RolloutThresholds | None = None,
) -> coordinator_pb2.Rollout:
    request = coordinator_pb2.DeployRequest(portfolio=portfolio, edges=edges, canary=canary, thresholds=thresholds)
    return coordinator_stub(address, transport).Deploy(request, timeout=RPC_TIMEOUT_S * 6).rollout


def pin(address: str, transport: Transport, edges: str, variant_id: str) -> coordinator_pb2.PinResponse:
    return coordinator_stub(address, transport).Pin(
        coordinator_pb2.PinRequest(edges=edges, variant_id=variant_id), timeout=RPC_TIMEOUT_S
    )


def rollback(address: str, transport: Transport, rollout_id: int = 0, reason: str = "") -> coordinator_pb2.Rollout:
    request = coordinator_pb2.RollbackRequest(rollout_id=rollout_id, reason=reason)
    return coordinator_stub(address, transport).Rollback(request, timeout=RPC_TIMEOUT_S).rollout


def rollouts_table(address: str, transport: Transport, limit: int = 20) -> str:
    reply = coordinator_stub(address, transport).ListRollouts(
        coordinator_pb2.ListRolloutsRequest(limit=limit), timeout=RPC_TIMEOUT_S
    )
    rows = [
        (
            r.id,
            time.strftime("%H:%M:%S", time.localtime(r.created_at)),
            r.portfolio_id,
            r.previous_portfolio_id or "-",
            r.selector,
            ",".join(r.canary_edges),
            len(r.edges),
            r.state,
            r.reason,
        )
        for r in reply.rollouts
    ]
    return table(("id", "created", "portfolio", "previous", "edges", "canary", "n", "state", "reason"), rows)
