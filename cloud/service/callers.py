"""Who may call what on the cloud, and how many calls each kind of caller may hold: one interceptor.

Roles (mutual TLS only; `common.identity` reads them from the caller's certificate):
    operator methods (`OPERATOR_METHODS`)   the operator's certificate (and the token, `common.token_check`)
    Register, Connect, Renew                an edge's certificate (its name is checked by the servicer)
    ListVariants, FetchVariant              an edge's or the operator's certificate
    health, reflection                      any certificate of the CA
Anything else is PERMISSION_DENIED naming the method, the roles it takes and the caller's identity;
so is a certificate revoked (`cloud.service.revocations`), whatever the method.
In plaintext (`--insecure`) there are no identities: roles are not checked and names are taken as given.

Capacity. RPCs in progress are counted in two pools: operator methods in their own (`operator_rpcs`),
everything else (edge streams, downloads, health) in the fleet's (`max_rpcs`). Edges can fill theirs,
never the operator's: a fleet of idle streams cannot lock the operator out. Each caller also holds at
most `fetches_per_caller` downloads at once. Beyond any bound: RESOURCE_EXHAUSTED (an edge retries).
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter
from dataclasses import dataclass

import grpc

from cloud.service.revocations import Revocations
from common.identity import Identity, peer_identity

COORDINATOR, PORTFOLIO = "/prunefleet.v1.CoordinatorService/", "/prunefleet.v1.PortfolioService/"
FETCH = PORTFOLIO + "FetchVariant"
ENROLMENT = "/prunefleet.v1.EnrolmentService/"
EDGE_ROLES = {COORDINATOR + "Register": ("edge",), COORDINATOR + "Connect": ("edge",), ENROLMENT + "Renew": ("edge",)}
DOWNLOAD_ROLES = {PORTFOLIO + "ListVariants": ("edge", "operator"), FETCH: ("edge", "operator")}


@dataclass(frozen=True)
class CallerLimits:
    """The capacity each kind of caller has (see the module's doc)."""

    max_rpcs: int = 10_000
    operator_rpcs: int = 64
    fetches_per_caller: int = 8

    def __post_init__(self) -> None:
        for name in ("max_rpcs", "operator_rpcs", "fetches_per_caller"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Slots:
    """RPCs in progress per key, each key with its bound; thread-safe (sync handlers run in threads)."""

    def __init__(self):
        self._lock, self._held = threading.Lock(), Counter()

    def take(self, wanted: list[tuple[object, int]]) -> bool:
        """Take one slot of every key, or none of them when one is full."""
        with self._lock:
            if any(self._held[key] >= bound for key, bound in wanted):
                return False
            for key, _ in wanted:
                self._held[key] += 1
            return True

    def give(self, keys: list) -> None:
        with self._lock:
            for key in keys:
                self._held[key] -= 1

    def held(self, key) -> int:
        with self._lock:
            return self._held[key]


def _roles(method: str, operator_methods: frozenset[str]) -> tuple[str, ...]:
    if method in operator_methods:
        return ("operator",)
    return EDGE_ROLES.get(method) or DOWNLOAD_ROLES.get(method) or ()


class CheckCallers(grpc.aio.ServerInterceptor):
    """Each call's role is checked and its slots taken before its servicer runs (module's doc)."""

    def __init__(self, operator_methods, limits: CallerLimits, tls: bool, revocations: Revocations | None = None):
        self._operator = frozenset(operator_methods)
        self._limits, self._tls, self.slots = limits, tls, Slots()
        self._revocations = revocations or Revocations(None)

    def admit(self, method: str, context) -> tuple[list, tuple[grpc.StatusCode, str] | None]:
        """(the slots taken, the refusal); the slots are given back when the call ends."""
        caller = peer_identity(context) if self._tls else None
        roles = _roles(method, self._operator)
        if self._tls and roles and (caller is None or caller.role not in roles):
            return [], (grpc.StatusCode.PERMISSION_DENIED, _wrong_role(method, roles, caller))
        if caller is not None and self._revocations.refuses(caller, context):
            return [], (grpc.StatusCode.PERMISSION_DENIED, f"the certificate of {caller.uri} is revoked")
        pool = "operator" if method in self._operator else "fleet"
        wanted = [(pool, self._limits.operator_rpcs if pool == "operator" else self._limits.max_rpcs)]
        if method == FETCH and caller is not None:
            wanted.append(((FETCH, caller), self._limits.fetches_per_caller))
        if not self.slots.take(wanted):
            return [], (grpc.StatusCode.RESOURCE_EXHAUSTED, _full(pool, wanted, caller))
        return [key for key, _ in wanted], None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        return _guarded(handler, lambda context: self.admit(details.method, context), self.slots.give)


def impersonation(context, edge: str) -> str:
    """Why the caller may not speak for `edge` ("" when it may: its certificate names it, or plaintext)."""
    caller = peer_identity(context)
    if caller is None or caller.name == edge:
        return ""
    return f"this certificate is edge '{caller.name}'; it cannot speak for edge '{edge[:128]}'"


def _wrong_role(method: str, roles: tuple[str, ...], caller: Identity | None) -> str:
    who = caller.uri if caller else "no prunefleet identity"
    return f"{method} takes a certificate of role {' or '.join(roles)}; the caller's names {who}"


def _full(pool: str, wanted: list, caller: Identity | None) -> str:
    if len(wanted) > 1 and pool == "fleet":
        return f"too many calls in progress ({pool} pool, or downloads of {caller.uri if caller else 'this caller'})"
    return f"too many {pool} calls in progress ({wanted[0][1]}); retry later"


def _guarded(handler, admit, give) -> grpc.RpcMethodHandler:
    """The handler, with `admit(context)` before its behavior and `give(slots)` after it, whatever its shape."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            make = getattr(grpc, f"{kind}_rpc_method_handler")
            return make(_wrapped(behavior, admit, give), handler.request_deserializer, handler.response_serializer)
    return handler


def _wrapped(behavior, admit, give):
    if inspect.isasyncgenfunction(behavior):

        async def stream(request, context):
            taken, refusal = admit(context)
            if refusal:
                await context.abort(*refusal)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                give(taken)

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def unary(request, context):
            taken, refusal = admit(context)
            if refusal:
                await context.abort(*refusal)
            try:
                return await behavior(request, context)
            finally:
                give(taken)

        return unary

    if inspect.isgeneratorfunction(behavior):

        def blocking_stream(request, context):
            taken, refusal = admit(context)
            if refusal:
                context.abort(*refusal)
            try:
                yield from behavior(request, context)
            finally:
                give(taken)

        return blocking_stream

    def blocking(request, context):  # sync functions run in the server's thread pool
        taken, refusal = admit(context)
        if refusal:
            context.abort(*refusal)
        try:
            return behavior(request, context)
        finally:
            give(taken)

    return blocking
