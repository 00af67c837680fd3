"""How the fuzz judges one answer to one request, by the RPC's entry in `bench.fuzz.rules`.

A verdict is a crash when the code is UNKNOWN (an unhandled exception), outside the allowed set, OK
for a bad request, an error for a good one, an empty OK reply, or a message that names nothing. A call
without the operator's token must be refused as unauthenticated, whatever it asked. Raw bytes that do
not parse must be refused by gRPC itself.
"""

from __future__ import annotations

import grpc

from bench.fuzz.cases import Known
from bench.fuzz.rules import GRPC_PARSE, TRANSPORT, Rpc

S = grpc.StatusCode


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
