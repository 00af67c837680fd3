"""PortfolioService: lists the current portfolio and streams its files in chunks, resumable by offset.

`ListVariants` answers the current portfolio's listing as the catalog signs it (`Catalog.listing`:
under the listing version and expiry, the whole listing signed when the cloud has a key).

Any file of any portfolio the cloud knows can be fetched by its id (an edge being rolled back needs the
old ones): a member's own file (a float32 variant's safetensors file, an int8 member's ONNX file) and
a member's ONNX file, so an edge fetches what its backend serves and nothing else. A bad id is
refused before the file system is touched. `ListVariants` is a plain function (the server runs it in
its thread pool); `FetchVariant` a coroutine on the server's event loop.

`FetchVariant` yields each chunk already in `VariantChunk`'s wire format (`common.chunks.encode_chunk`),
registered with a pass-through serializer (`add_to_server`): the file's bytes are copied once into the
message instead of into a protobuf object and again out of it (see `prunefleet bench transfer`).
Clients see an ordinary `VariantChunk` stream.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

import grpc

from cloud.build.store import StoreError
from cloud.service.catalog import Catalog
from common.chunks import encode_chunk
from common.files import is_sha256_hex
from common.wire import CHUNK_BYTES
from protos import portfolio_pb2, portfolio_pb2_grpc


def _pass_through(message: bytes) -> bytes:
    return message


class PortfolioServicer(portfolio_pb2_grpc.PortfolioServiceServicer):
    def __init__(
        self, catalog: Catalog, chunk_bytes: int = CHUNK_BYTES, on_bytes_sent=None, blocking: Executor | None = None
    ):
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {CHUNK_BYTES}]")
        self._catalog = catalog
        self._chunk_bytes = chunk_bytes
        self._on_bytes_sent = on_bytes_sent or (lambda n: None)
        self._blocking = blocking  # executor for file reads (None: the loop's default)

    def ListVariants(self, request, context):
        try:
            return self._catalog.listing()
        except StoreError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    async def FetchVariant(self, request, context):
        """A coroutine on the cloud's event loop: each chunk is read in `blocking` and handed to gRPC,
        which sends it as the edge reads (flow control), so a download holds no thread while it waits."""
        if not is_sha256_hex(request.variant_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"variant_id {request.variant_id[:80]!r} is not a sha256 hex string (64 lowercase hex digits)",
            )
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._blocking, self._catalog.artifact, request.variant_id)
        if found is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"variant_id {request.variant_id}: no variant or ONNX file of this cloud's portfolios has this id",
            )
        path, size = found
        if not 0 <= request.offset <= size:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is outside the file (0..{size})"
            )
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := await loop.run_in_executor(self._blocking, f.read, self._chunk_bytes):
                yield encode_chunk(offset, data, size, request.variant_id)
                self._on_bytes_sent(len(data))  # gRPC took the message: its flow control let it through
                offset += len(data)


def add_to_server(servicer: PortfolioServicer, server) -> None:
    """`portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server`, except that FetchVariant's responses
    are the wire bytes the servicer already encoded."""
    handlers = {
        "ListVariants": grpc.unary_unary_rpc_method_handler(
            servicer.ListVariants,
            request_deserializer=portfolio_pb2.ListVariantsRequest.FromString,
            response_serializer=portfolio_pb2.ListVariantsResponse.SerializeToString,
        ),
        "FetchVariant": grpc.unary_stream_rpc_method_handler(
            servicer.FetchVariant,
            request_deserializer=portfolio_pb2.FetchVariantRequest.FromString,
            response_serializer=_pass_through,
        ),
    }
    service = portfolio_pb2.DESCRIPTOR.services_by_name["PortfolioService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
