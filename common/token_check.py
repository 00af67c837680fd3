"""The server's side of the operator token: guarded methods are refused without it.

Operator RPCs carry `authorization: Bearer TOKEN` metadata, added by the client's channel
(`common.security.BearerToken`). A server guards the methods it names with `RequireToken` (or
`RequireTokenAsync` on a `grpc.aio` server, the cloud's): a guarded call without the header, with a
wrong token or with the header twice is answered UNAUTHENTICATED before its servicer runs. The
comparison takes constant time, so the answer's timing tells nothing about the token. Apart from
`common.security` because only a server that guards methods needs it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

import grpc

from common.security import AUTHORIZATION, MIN_TOKEN_CHARS, SecurityError


def _refuse(message: str) -> grpc.RpcMethodHandler:
    def handler(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(handler)


def _refuse_async(message: str) -> grpc.RpcMethodHandler:
    async def handler(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(handler)


class RequireToken(grpc.ServerInterceptor):
    """UNAUTHENTICATED for a guarded method called without the token (every guarded method is unary)."""

    def __init__(self, token: str, methods: Collection[str]):
        if len(token) < MIN_TOKEN_CHARS:
            raise SecurityError(f"a token is at least {MIN_TOKEN_CHARS} characters")
        self._expected = f"Bearer {token}".encode()
        self._methods = frozenset(methods)

    def refusal(self, details) -> str:
        """Why this call is refused ("" when it may go on)."""
        if details.method not in self._methods:
            return ""
        sent = [v for k, v in details.invocation_metadata or () if k == AUTHORIZATION]
        if not sent:
            return "this call needs an operator token: 'authorization: Bearer TOKEN'"
        value = sent[0].encode() if isinstance(sent[0], str) else sent[0]
        if len(sent) != 1 or not hmac.compare_digest(value, self._expected):
            return "the operator token is wrong"
        return ""

    def intercept_service(self, continuation: Callable, details):
        refusal = self.refusal(details)
        return _refuse(refusal) if refusal else continuation(details)


class RequireTokenAsync(grpc.aio.ServerInterceptor):
    """`RequireToken` for a `grpc.aio` server (the cloud's)."""

    def __init__(self, token: str, methods: Collection[str]):
        self._check = RequireToken(token, methods)

    async def intercept_service(self, continuation, details):
        refusal = self._check.refusal(details)
        return _refuse_async(refusal) if refusal else await continuation(details)
