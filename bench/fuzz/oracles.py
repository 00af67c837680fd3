"""Per-RPC oracles of the fuzz: whether a request is bad by the published contract, and whether an OK
reply to it holds what it must.

A `*_bad` oracle takes (request, known) and says why the request is bad, "" when it is good, or None
when the contract alone cannot tell (it depends on the state of the fleet). An `*_empty` check takes
(request, replies, known) and says what is wrong with an OK reply, None when it is fine. The policy is
judged by the contract the coordinator and the edges apply (`common.policy_contract`), and what an
edge sends by the bounds both sides apply (`common.edge_input`), so the fuzz cannot drift from them.
Page tokens are judged by the cloud's own token format (`cloud.service.paging`): a token decodes to
where a page ended, for the same RPC and query, or it is bad. `bench.fuzz.rules` pairs each RPC with
its two.
"""

from __future__ import annotations

import math

import numpy as np

from bench.fuzz.cases import FUZZ_EDGE, Known
from cloud.service import paging
from common import edge_input, policy_contract
from common.files import short_id


def _edge_name(name: str) -> bool:
    """The contract's edge name: 1-128 letters, digits, '-', '_' or '.'."""
    return edge_input.edge_name_problem(name) is None


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def always_good(r, k: Known):
    return ""


def nothing_to_check(r, replies, k: Known):
    return None


def nonempty(field: str):
    """The check that an OK reply's `field` holds something."""
    return lambda r, replies, k: None if getattr(replies[0], field) else f"empty {field}"


# --- PortfolioService and InferenceService -----------------------------------------------------------
def fetch_bad(r, k: Known):
    if r.variant_id not in k.sizes:
        return "unknown variant id"
    return "" if 0 <= r.offset <= k.sizes[r.variant_id] else "offset outside the file"


def fetch_empty(r, replies, k: Known):
    got = sum(len(c.data) for c in replies)
    if got != k.sizes[r.variant_id] - r.offset or any(c.sha256 != r.variant_id for c in replies):
        return f"streamed {got} bytes from offset {r.offset} of {k.sizes[r.variant_id]}"
    return None


def predict_bad(r, k: Known):
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


def predict_empty(r, replies, k: Known):
    out = replies[0].output
    if list(out.shape)[:1] != [r.input.shape[0]] or len(out.shape) != 2 or replies[0].variant_id not in k.sizes:
        return f"output shape {list(out.shape)} from {short_id(replies[0].variant_id)!r}"
    return None


# --- CoordinatorService: the edges' side ------------------------------------------------------------
def register_bad(r, k: Known):
    """Bad when its fields are, or when it names another edge than the fuzz's certificate does."""
    return edge_input.register_problem(r) or ("another edge's name" if r.edge != FUZZ_EDGE else "")


def register_empty(r, replies, k: Known):
    reply = replies[0]
    return None if reply.variants and reply.policy.version >= 1 else "no portfolio or policy"


def connect_bad(reports, k: Known):
    if not reports:
        return ""
    first = reports[0].edge
    if not _edge_name(first):
        return "not an edge name"
    if first != FUZZ_EDGE:
        return "another edge's name than the certificate's"
    if first not in k.edges:
        return None  # the fuzzed Register calls may have registered it
    for rep in reports:  # the stream ends at the first report refused
        if rep.edge != first:
            return "a second edge on one stream"
        if found := edge_input.report_problem(rep):
            return found
    return ""


def connect_empty(reports, replies, k: Known):
    return None if replies and replies[0].WhichOneof("body") == "policy" else "no policy on the stream"


# --- CoordinatorService: the operator's side --------------------------------------------------------
def policy_bad(r, k: Known):
    """Bad when the contract refuses a setting (read as the coordinator reads it: unset ones filled),
    or when the pinned variant is not one of the portfolio's, which the contract cannot know."""
    found = policy_contract.problem(policy_contract.filled(r.policy))
    if found is not None:
        return found
    return "" if r.policy.pinned_variant in ("", *k.variant_ids) else "pinned variant not in the portfolio"


def policy_empty(r, replies, k: Known):
    return None if replies[0].policy.version >= 2 and replies[0].policy.slo_ms > 0 else "no policy version"


def _page_bad(size: int, token: str, rpc: str, query: list, key_types: tuple) -> str:
    """Why a page request is bad (a negative size, a token not of this query or not naming a page's
    end by keys of these types), or ""."""
    if size < 0:
        return "page_size"
    try:
        after = paging.decode(token, rpc, query)
    except paging.PageTokenError:
        return "page_token"
    if after is not None and (len(after) != len(key_types) or not all(map(isinstance, after, key_types))):
        return "page_token keys"
    return ""


def fleet_bad(r, k: Known):
    return _page_bad(r.page_size, r.page_token, "GetFleet", [], (str,))


def fleet_empty(r, replies, k: Known):
    return None if replies[0].policy.version >= 1 and replies[0].portfolio_id else "no policy or portfolio"


def events_bad(r, k: Known):
    if not (0 <= r.limit <= 10_000 and not math.isnan(r.since)):
        return "limit or since"
    size = r.page_size or r.limit
    return _page_bad(size, r.page_token, "ListEvents", [r.edge, r.since], (int | float, int))


def deploy_bad(r, k: Known):
    t = r.thresholds
    if r.canary < 0 or not _finite(t.min_slo_attainment, t.max_error_rate, t.adopt_timeout_s):
        return "canary or thresholds"
    if r.portfolio != k.portfolio_id:
        return "not a portfolio"
    return None  # depends on the rollouts in progress and the registered edges


def rollout_empty(r, replies, k: Known):
    return None if replies[0].rollout.id >= 1 and replies[0].rollout.state else "no rollout"


def rollback_bad(r, k: Known):
    return "rollout id or reason" if r.rollout_id < 0 or len(r.reason) > 1000 else None


def rollouts_bad(r, k: Known):
    return "" if 0 <= r.limit <= 1000 else "limit"


def pin_bad(r, k: Known):
    if r.variant_id and r.variant_id not in k.variant_ids:
        return "variant id"
    names = [p.strip() for p in r.edges.split(",") if p.strip()]
    return "no edge named" if not names or len(r.edges) > 4096 else None


def pin_empty(r, replies, k: Known):
    return None if replies[0].edges and replies[0].policy.version >= 2 else "no edges"
