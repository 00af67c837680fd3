"""Requests that do not parse: INVALID_ARGUMENT naming the message type, on the cloud's `grpc.aio` server.

Left to itself, the aio server answers bytes that do not parse as the method's request with UNKNOWN
and logs a traceback (a bidirectional stream even ends with OK). `ParseRequests` takes each handler's
request parser into the handler: a unary request that does not parse is refused before the servicer
runs; a message on a request stream that does not parse raises `BadRequest` where the servicer reads
it, and the servicer ends the stream with INVALID_ARGUMENT. Sync handlers stay sync (the server runs
them in its thread pool), coroutines stay coroutines.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError

from common.errors import PrunefleetError


class BadRequest(PrunefleetError, ValueError):
    """A message on a request stream that does not parse; the text names the problem."""


def _parser(parse, method: str):
    def parsed(raw: bytes):
        try:
            return parse(raw)
        except (DecodeError, ValueError, TypeError) as err:
            raise BadRequest(f"cannot parse the request message of {method}: {err}") from None

    return parsed


def _unary(parse, behavior):
    if inspect.iscoroutinefunction(behavior):

        async def handle(raw, context):
            try:
                request = parse(raw)
            except BadRequest as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return await behavior(request, context)
    else:

        def handle(raw, context):
            try:
                request = parse(raw)
            except BadRequest as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return behavior(request, context)

    return handle


def _server_stream(parse, behavior):
    async def handle(raw, context):
        try:
            request = parse(raw)
        except BadRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        async for response in behavior(request, context):
            yield response

    return handle


def _bidi(parse, behavior):
    async def handle(raw_requests, context):
        async def requests():
            async for raw in raw_requests:
                yield parse(raw)

        async for response in behavior(requests(), context):
            yield response

    return handle


class ParseRequests(grpc.aio.ServerInterceptor):
    """Every handler parses its own requests (see the module's doc); methods without a parser pass."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        parse = getattr(handler, "request_deserializer", None)
        if handler is None or parse is None:
            return handler
        out, parse = handler.response_serializer, _parser(parse, details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_unary(parse, handler.unary_unary), None, out)
        if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(_server_stream(parse, handler.unary_stream), None, out)
        if handler.stream_stream and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(_bidi(parse, handler.stream_stream), None, out)
        return handler  # other shapes keep gRPC's own parsing
