"""What each RPC may answer to a fuzzed request, and how an answer is judged.

For every RPC: the status codes it may answer (beyond OK), words one of which an error's message must
hold (so it names the problem), an oracle that says whether a request is bad (the reason), good
("") or undecided (None) from the published contract, and a check that an OK reply is not empty.
A verdict is a crash when the code is UNKNOWN (an unhandled exception), outside the allowed set,
OK for a bad request, an error for a good one, an empty OK reply, or a message that names nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from bench.fuzz import cases
from bench.fuzz.cases import Known
from common.files import short_id
from protos import coordinator_pb2, inference_pb2, portfolio_pb2

S = grpc.StatusCode
TRANSPORT = {S.RESOURCE_EXHAUSTED: ("larger than max", "limit", "exceed")}  # a message over the size limit
GRPC_PARSE = {S.INTERNAL: ("deserializ",), S.INVALID_ARGUMENT: ("deserializ", "parse")}


@dataclass(frozen=True)
class Rpc:
    name: str
    method: str  # /package.Service/Method
    request: type
    reply: type
    kind: str  # "unary", "server_stream", "bidi"
    strategy: Callable[[Known], object]
    codes: dict  # allowed error code -> words one of which the message must hold
    bad: Callable  # (request, known) -> reason it is bad, "" when good, None when undecided
    empty: Callable  # (request, replies, known) -> what is wrong with an OK reply, None when fine
    operator: bool = False  # needs the operator token


def _edge_name(name: str) -> bool:
    """The contract's edge name: 1-128 letters, digits, '-', '_' or '.'."""
    return 0 < len(name) <= 128 and all(c.isalnum() or c in "-_." for c in name)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# --- oracles ----------------------------------------------------------------------------------------
def _fetch_bad(r, k: Known):
    if r.variant_id not in k.sizes:
        return "unknown variant id"
    return "" if 0 <= r.offset <= k.sizes[r.variant_id] else "offset outside the file"


def _fetch_empty(r, replies, k: Known):
    got = sum(len(c.data) for c in replies)
    if got != k.sizes[r.variant_id] - r.offset or any(c.sha256 != r.variant_id for c in replies):
        return f"streamed {got} bytes from offset {r.offset} of {k.sizes[r.variant_id]}"
    return None


def _predict_bad(r, k: Known):
    t = r.input
    if t.dtype not in ("float32", "uint8"):
        return "dtype"
    if len(t.shape) != 4 or tuple(t.shape[1:]) != k.input_shape or not 1 <= t.shape[0] <= k.max_batch:
        return "shape"
    if len(t.data) != math.prod(t.shape) * (1 if t.dtype == "uint8" else 4):
        return "byte count"
    if t.dtype == "float32" and not np.isfinite(np.frombuffer(t.data, "<f4")).all():
        return "NaN or Inf"
    return ""


def _predict_empty(r, replies, k: Known):
    out = replies[0].output
    if list(out.shape)[:1] != [r.input.shape[0]] or len(out.shape) != 2 or replies[0].variant_id not in k.sizes:
        return f"output shape {list(out.shape)} from {short_id(replies[0].variant_id)!r}"
    return None


def _register_bad(r, k: Known):
    if not _edge_name(r.edge):
        return "edge name"
    if r.threads < 0 or any(len(a) > 256 or not a.isprintable() for a in (r.address, r.metrics_address)):
        return "threads or address"
    return ""


def _register_empty(r, replies, k: Known):
    reply = replies[0]
    return None if reply.variants and reply.policy.version >= 1 else "no portfolio or policy"


def _connect_bad(reports, k: Known):
    if not reports:
        return ""
    first = reports[0].edge
    if not _edge_name(first):
        return "not an edge name"
    if first not in k.edges:
        return None  # the fuzzed Register calls may have registered it
    if any(rep.edge != first for rep in reports):
        return "a second edge on one stream"
    for rep in reports:
        if rep.WhichOneof("body") == "telemetry":
            t = rep.telemetry
            if not _finite(t.timestamp, t.request_rate, t.p50_ms, t.p95_ms, t.p99_ms) or t.requests < 0 or t.errors < 0:
                return "telemetry values"
    return None  # switch events and profiles are the edge's own record


def _connect_empty(reports, replies, k: Known):
    return None if replies and replies[0].WhichOneof("body") == "policy" else "no policy on the stream"


def _policy_bad(r, k: Known):
    p = r.policy
    if not _finite(p.slo_ms, p.min_accuracy, p.up_headroom, p.dwell_s, p.window_s):
        return "non-finite value"
    checks = [
        p.slo_ms == 0 or 0.001 <= p.slo_ms <= 3.6e6,
        0 <= p.min_accuracy <= 1,
        p.down_windows >= 0,
        p.up_windows >= 0,
        0 <= p.up_headroom <= 1,
        p.dwell_s >= 0,
        p.window_s == 0 or 0.1 <= p.window_s <= 60,
        0 <= p.max_switches_per_minute <= 600,
        p.pinned_variant in ("", *k.variant_ids),
    ]
    return "" if all(checks) else "out of range"


def _policy_empty(r, replies, k: Known):
    return None if replies[0].policy.version >= 2 and replies[0].policy.slo_ms > 0 else "no policy version"


def _events_bad(r, k: Known):
    return "" if 0 <= r.limit <= 10_000 and not math.isnan(r.since) else "limit or since"


def _deploy_bad(r, k: Known):
    t = r.thresholds
    if r.canary < 0 or not _finite(t.min_slo_attainment, t.max_error_rate, t.adopt_timeout_s):
        return "canary or thresholds"
    if r.portfolio != k.portfolio_id:
        return "not a portfolio"
    return None  # depends on the rollouts in progress and the registered edges


def _rollout_empty(r, replies, k: Known):
    return None if replies[0].rollout.id >= 1 and replies[0].rollout.state else "no rollout"


def _rollback_bad(r, k: Known):
    return "rollout id or reason" if r.rollout_id < 0 or len(r.reason) > 1000 else None


def _rollouts_bad(r, k: Known):
    return "" if 0 <= r.limit <= 1000 else "limit"


def _pin_bad(r, k: Known):
    if r.variant_id and r.variant_id not in k.variant_ids:
        return "variant id"
    names = [p.strip() for p in r.edges.split(",") if p.strip()]
    return "no edge named" if not names or len(r.edges) > 4096 else None


def _pin_empty(r, replies, k: Known):
    return None if replies[0].edges and replies[0].policy.version >= 2 else "no edges"


def _always(r, k: Known):
    return ""


def _nonempty(field: str):
    return lambda r, replies, k: None if getattr(replies[0], field) else f"empty {field}"


def _fleet_empty(r, replies, k: Known):
    return None if replies[0].policy.version >= 1 and replies[0].portfolio_id else "no policy or portfolio"


# --- the RPCs ---------------------------------------------------------------------------------------
def _rpc(service: str, name: str, request, reply, kind, strategy, codes, bad, empty, operator=False) -> Rpc:
    return Rpc(name, f"/prunefleet.v1.{service}/{name}", request, reply, kind, strategy, codes, bad, empty, operator)


C, P, I = "CoordinatorService", "PortfolioService", "InferenceService"  # noqa: E741 - the three services, by initial
ARG = (S.INVALID_ARGUMENT,)
RPCS = (
    _rpc(
        P,
        "ListVariants",
        portfolio_pb2.ListVariantsRequest,
        portfolio_pb2.ListVariantsResponse,
        "unary",
        cases.list_variants,
        {},
        _always,
        _nonempty("variants"),
    ),
    _rpc(
        P,
        "FetchVariant",
        portfolio_pb2.FetchVariantRequest,
        portfolio_pb2.VariantChunk,
        "server_stream",
        cases.fetch_variant,
        {S.INVALID_ARGUMENT: ("variant_id",), S.NOT_FOUND: ("variant",), S.OUT_OF_RANGE: ("offset",)},
        _fetch_bad,
        _fetch_empty,
    ),
    _rpc(
        I,
        "Predict",
        inference_pb2.PredictRequest,
        inference_pb2.PredictResponse,
        "unary",
        cases.predict,
        {S.INVALID_ARGUMENT: ("dtype", "shape", "bytes", "nan"), S.RESOURCE_EXHAUSTED: ("limit", "bytes")},
        _predict_bad,
        _predict_empty,
    ),
    _rpc(
        C,
        "Register",
        coordinator_pb2.RegisterRequest,
        coordinator_pb2.RegisterResponse,
        "unary",
        cases.register,
        {S.INVALID_ARGUMENT: ("edge", "threads", "address")},
        _register_bad,
        _register_empty,
    ),
    _rpc(
        C,
        "Connect",
        coordinator_pb2.EdgeReport,
        coordinator_pb2.Directive,
        "bidi",
        cases.connect,
        {S.PERMISSION_DENIED: ("edge",), S.INVALID_ARGUMENT: ("telemetry", "timestamp", "request")},
        _connect_bad,
        _connect_empty,
    ),
    _rpc(
        C,
        "GetFleet",
        coordinator_pb2.GetFleetRequest,
        coordinator_pb2.GetFleetResponse,
        "unary",
        cases.get_fleet,
        {},
        _always,
        _fleet_empty,
        operator=True,
    ),
    _rpc(
        C,
        "SetPolicy",
        coordinator_pb2.SetPolicyRequest,
        coordinator_pb2.SetPolicyResponse,
        "unary",
        cases.set_policy,
        {
            S.INVALID_ARGUMENT: (
                "slo_ms",
                "min_accuracy",
                "windows",
                "headroom",
                "dwell_s",
                "window_s",
                "switches",
                "pinned_variant",
                "finite",
            )
        },
        _policy_bad,
        _policy_empty,
        operator=True,
    ),
    _rpc(
        C,
        "ListEvents",
        coordinator_pb2.ListEventsRequest,
        coordinator_pb2.ListEventsResponse,
        "unary",
        cases.list_events,
        {S.INVALID_ARGUMENT: ("limit", "since")},
        _events_bad,
        lambda *a: None,
        operator=True,
    ),
    _rpc(
        C,
        "Deploy",
        coordinator_pb2.DeployRequest,
        coordinator_pb2.DeployResponse,
        "unary",
        cases.deploy,
        {
            S.INVALID_ARGUMENT: ("portfolio", "selector", "canary", "min_", "max_error_rate", "adopt_timeout"),
            S.FAILED_PRECONDITION: ("rollout",),
        },
        _deploy_bad,
        _rollout_empty,
        operator=True,
    ),
    _rpc(
        C,
        "Rollback",
        coordinator_pb2.RollbackRequest,
        coordinator_pb2.RollbackResponse,
        "unary",
        cases.rollback,
        {
            S.INVALID_ARGUMENT: ("rollout_id", "reason"),
            S.NOT_FOUND: ("rollout",),
            S.FAILED_PRECONDITION: ("rollout", "rolled back"),
        },
        _rollback_bad,
        _rollout_empty,
        operator=True,
    ),
    _rpc(
        C,
        "ListRollouts",
        coordinator_pb2.ListRolloutsRequest,
        coordinator_pb2.ListRolloutsResponse,
        "unary",
        cases.list_rollouts,
        {S.INVALID_ARGUMENT: ("limit",)},
        _rollouts_bad,
        lambda *a: None,
        operator=True,
    ),
    _rpc(
        C,
        "Pin",
        coordinator_pb2.PinRequest,
        coordinator_pb2.PinResponse,
        "unary",
        cases.pin,
        {S.INVALID_ARGUMENT: ("variant_id", "edges"), S.NOT_FOUND: ("selector", "edge")},
        _pin_bad,
        _pin_empty,
        operator=True,
    ),
)
BY_NAME = {rpc.name: rpc for rpc in RPCS}


def _words_ok(details: str, words: tuple[str, ...]) -> bool:
    return any(w.lower() in details.lower() for w in words)


def judge(
    rpc: Rpc, request, code: grpc.StatusCode, details: str, replies: list, known: Known, token: str = "right"
) -> str | None:
    """The problem with this answer to `request` (parsed), or None when it is a right answer."""
    if code == S.UNKNOWN or "Exception calling application" in details or "Exception iterating" in details:
        return f"unhandled exception: {details[:200]}"
    if rpc.operator and token != "right":
        if code == S.RESOURCE_EXHAUSTED and _words_ok(details, ("metadata",)):
            return None  # gRPC refuses headers over its limit before any token check
        if code != S.UNAUTHENTICATED or not _words_ok(details, ("token",)):
            return f"{code.name} without the right token: {details[:200]}"
        return None
    bad = rpc.bad(request, known)
    if code == S.OK:
        if bad:
            return f"OK to a bad request ({bad})"
        return rpc.empty(request, replies, known)
    allowed = {**TRANSPORT, **rpc.codes}
    if code not in allowed:
        return f"{code.name} is not an answer {rpc.name} may give: {details[:200]}"
    if not details or not _words_ok(details, allowed[code]):
        return f"{code.name} message names no problem: {details[:200]!r}"
    if bad == "" and code != S.RESOURCE_EXHAUSTED:
        return f"{code.name} to a good request: {details[:200]}"
    return None


def judge_garbage(
    rpc: Rpc, data: bytes, code: grpc.StatusCode, details: str, replies: list, known: Known
) -> str | None:
    """Raw bytes: when they parse as the request, judged as that request (or refused by gRPC, whose
    parser may be stricter than ours); otherwise they must be refused by gRPC itself."""
    refused_by_grpc = code in GRPC_PARSE and _words_ok(details, GRPC_PARSE[code])
    try:
        message = rpc.request.FromString(data)
    except Exception:
        message = None
    if message is None:
        return None if refused_by_grpc else f"{code.name} to bytes that do not parse: {details[:200]}"
    problem = judge(rpc, [message] if rpc.kind == "bidi" else message, code, details, replies, known)
    return None if problem is None or refused_by_grpc else problem
