"""Operator commands: talk to a running cloud over gRPC and print tables (`prunefleet deploy`: `upload_client`).

The fleet and its events are read page by page (`fleet`, `events`) until the cloud says there is no
more, so a fleet of any size reads through messages under the limit. Every cell of every table, and
every line built from what the cloud answers, is escaped (`common.escaping.escaped`): a name or reason
from the network cannot start a line or send an escape sequence to the operator's terminal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from cloud.build.store import Manifest
from common.escaping import escaped
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
    """Columns aligned under a rule; every cell escaped, so each row is one line of printable text."""
    cells = [[escaped(h) for h in headers]] + [[escaped(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


BACKEND_NAMES = {"torch": "torch", "onnxruntime": "ort"}  # how the table names what served a row
PRECISION_NAMES = {"float32": "fp32", "int8": "int8"}


def _runs(precision: str, backend: str) -> str:
    return f"{PRECISION_NAMES.get(precision, precision)} {BACKEND_NAMES.get(backend, backend)}"


def _member_rows(v) -> list[tuple[str, ...]]:
    """A member's (`VariantEntry`) row, its figures under the backend that serves it, and, for a
    float32 variant timed under ONNX Runtime too, a row for its ONNX file (accuracy not measured
    there: `-`)."""
    delta = "-" if v.acc_delta_pp is None else f"{v.acc_delta_pp:+.2f}pp"
    speedup = "-" if v.speedup_b32 is None else f"{v.speedup_b32:.2f}x"
    shape = (f"{100 * v.sparsity:.1f}%", f"{v.params:,}")
    latency = (f"{v.latency_ms_b1:.2f}", f"{v.latency_ms_b32:.2f}", speedup)
    own = (f"{v.size_bytes / 1024:.0f}", f"{100 * v.accuracy:.2f}%", delta)
    rows = [(v.name, _runs(v.precision, v.backend), short_id(v.variant_id), *shape, *own, *latency)]
    if v.onnx_id and v.ort_latency_ms_b1 is not None and v.ort_latency_ms_b32 is not None:
        ort_speedup = "-" if v.ort_speedup_b32 is None else f"{v.ort_speedup_b32:.2f}x"
        ort = (f"{v.ort_latency_ms_b1:.2f}", f"{v.ort_latency_ms_b32:.2f}", ort_speedup)
        size = f"{(v.onnx_bytes or 0) / 1024:.0f}"
        rows.append((v.name, _runs(v.precision, "onnxruntime"), short_id(v.onnx_id), *shape, size, "-", "-", *ort))
    return rows


def portfolio_table(manifest: Manifest) -> str:
    """The portfolio's members, below its dense model (marked `*`) when the manifest has one. Each
    row is one member served one way (`runs`: precision and backend, `ort` for ONNX Runtime): a
    float32 variant as torch serves it, then its ONNX file under ONNX Runtime when it was timed so,
    and an int8 member under ONNX Runtime. `vs dense` is accuracy against the dense model in points,
    `faster` how many times faster than it (torch) the row serves at batch 32, all timed in the same
    rounds. Short headers (`KiB`: the size of the row's file) keep it within 120 columns for names of
    up to 27 characters (an int8 member's is its parent's and `-int8`)."""
    dense, rows = manifest.dense, []
    if dense:
        latency = (f"{dense.latency_ms_b1:.2f}", f"{dense.latency_ms_b32:.2f}", "-")
        measured = ("-", f"{100 * dense.accuracy:.2f}%", "-", *latency)
        rows.append((f"* {dense.name}", _runs("float32", "torch"), "-", "0.0%", f"{dense.params:,}", *measured))
    for v in manifest.variants:
        rows.extend(_member_rows(v))
    headers = ("variant", "runs", "id", "sparsity", "params", "KiB", "acc", "vs dense")
    notes = [
        "runs: the precision of each row and what served it when it was timed (torch, or ort: ONNX Runtime)",
        f"* the dense model ({dense.source}): vs dense in accuracy points, faster at batch 32"
        if dense
        else "no dense model in this manifest: it was built before variants were compared with one",
    ]
    return "\n".join((table((*headers, "ms@b1", "ms@b32", "faster"), rows), *notes))


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
    portfolio = escaped(fleet.portfolio_id)
    header = f"portfolio {portfolio}  policy v{fleet.policy.version}: SLO p95 <= {fleet.policy.slo_ms:.1f} ms\n"
    header += "".join(f"withdrawn (no longer served): {escaped(w)}\n" for w in fleet.withdrawn_portfolios)
    return header + table(
        ("edge", "state", "active", "portfolio", "policy", "pin", "p95 ms", "req/s", "cpu", "rss", "last seen"), rows
    )


def variant_names(address: str, transport: Transport) -> dict[str, str]:
    stub = portfolio_pb2_grpc.PortfolioServiceStub(transport.channel(address))
    reply = stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_TIMEOUT_S)
    return {v.variant_id: v.name for v in reply.variants}


def fleet(stub, page_size: int = 0) -> coordinator_pb2.GetFleetResponse:
    """The whole fleet in one reply: every page of `GetFleet` (`page_size` edges each; 0: the cloud's
    default), followed until the last, under the first page's policy and portfolio."""
    whole, token = coordinator_pb2.GetFleetResponse(), ""
    while True:
        page = stub.GetFleet(
            coordinator_pb2.GetFleetRequest(page_size=page_size, page_token=token), timeout=RPC_TIMEOUT_S
        )
        if not token:
            whole.policy.CopyFrom(page.policy)
            whole.portfolio_id = page.portfolio_id
            whole.withdrawn_portfolios.extend(page.withdrawn_portfolios)
        whole.edges.extend(page.edges)
        if not page.next_page_token:
            return whole
        if page.next_page_token == token:
            raise RuntimeError("the cloud answered the same GetFleet page twice")
        token = page.next_page_token


def events(stub, edge: str = "", since: float = 0.0, limit: int = 0) -> list[coordinator_pb2.EdgeEvent]:
    """The newest `limit` switch events (0: every one) at or after `since`, of `edge` or of every edge
    (""), oldest first: pages of `ListEvents` from the newest back, followed until `limit` or the last."""
    found: list[coordinator_pb2.EdgeEvent] = []
    token = ""
    while not limit or len(found) < limit:
        request = coordinator_pb2.ListEventsRequest(
            edge=edge, since=since, page_size=limit - len(found) if limit else 0, page_token=token
        )
        page = stub.ListEvents(request, timeout=RPC_TIMEOUT_S)
        found = [*page.events, *found]  # each page is older than the one before
        if not page.next_page_token or page.next_page_token == token:
            break
        token = page.next_page_token
    return found


def fleet_status(address: str, transport: Transport) -> str:
    """`prunefleet fleet status`: every edge, page after page."""
    whole = fleet(coordinator_stub(address, transport))
    return fleet_table(whole, variant_names(address, transport), time.time())


def set_policy(address: str, transport: Transport, **changes) -> coordinator_pb2.Policy:
    """Start from the coordinator's current policy and change only the given fields."""
    stub = coordinator_stub(address, transport)
    first = coordinator_pb2.GetFleetRequest(page_size=1)  # only the policy is wanted: the smallest page
    policy = stub.GetFleet(first, timeout=RPC_TIMEOUT_S).policy
    for name, value in changes.items():
        if value is not None:
            setattr(policy, name, value)
    return stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=policy), timeout=RPC_TIMEOUT_S).policy


def events_table(address: str, transport: Transport, edge: str = "", limit: int = 100) -> str:
    """`prunefleet fleet events`: the newest `limit` decisions (0: every one), oldest first."""
    listed = events(coordinator_stub(address, transport), edge, limit=limit)
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
        for e in listed
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
    return escaped(
        f"rollout {rollout.id} of portfolio {rollout.portfolio_id} to {len(rollout.edges)} edge(s) "
        f"(canary {', '.join(rollout.canary_edges)}): {rollout.state}: {rollout.reason}"
    )


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
