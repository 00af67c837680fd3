"""PortfolioService: lists the portfolio and streams variant files in chunks, resumable by offset."""

from __future__ import annotations

import grpc

from cloud.store import PortfolioStore, StoreError, VariantEntry
from common.files import is_sha256_hex
from common.wire import CHUNK_BYTES
from protos import portfolio_pb2, portfolio_pb2_grpc


def variant_info(entry: VariantEntry) -> portfolio_pb2.VariantInfo:
    return portfolio_pb2.VariantInfo(
        variant_id=entry.variant_id, sha256=entry.variant_id, size_bytes=entry.size_bytes,
        params=entry.params, accuracy=entry.accuracy, method=entry.method, name=entry.name,
        arch=entry.arch, sparsity=entry.sparsity, compression=entry.compression,
        latency_ms_b1=entry.latency_ms_b1, level=entry.level, params_ratio=entry.params_ratio)


def list_variants(store: PortfolioStore) -> portfolio_pb2.ListVariantsResponse:
    manifest = store.manifest()
    return portfolio_pb2.ListVariantsResponse(
        variants=[variant_info(v) for v in manifest.variants], portfolio_id=manifest.portfolio_id)


class PortfolioServicer(portfolio_pb2_grpc.PortfolioServiceServicer):
    def __init__(self, store: PortfolioStore, chunk_bytes: int = CHUNK_BYTES, on_bytes_sent=None):
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {CHUNK_BYTES}]")
        self._store = store
        self._chunk_bytes = chunk_bytes
        self._on_bytes_sent = on_bytes_sent or (lambda n: None)

    def ListVariants(self, request, context):
        try:
            return list_variants(self._store)
        except StoreError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def _entry(self, variant_id: str, context) -> VariantEntry:
        if not is_sha256_hex(variant_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"variant_id {variant_id[:80]!r} is not a sha256 hex string (64 lowercase hex digits)")
        try:
            manifest = self._store.manifest()
        except StoreError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        entry = next((v for v in manifest.variants if v.variant_id == variant_id), None)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"variant {variant_id} is not in portfolio {manifest.portfolio_id}")
        return entry

    def FetchVariant(self, request, context):
        entry = self._entry(request.variant_id, context)
        if not 0 <= request.offset <= entry.size_bytes:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"offset {request.offset} is outside the file (0..{entry.size_bytes})")
        path = self._store.variant_path(entry.variant_id)
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while context.is_active():
                data = f.read(self._chunk_bytes)
                if not data:
                    break
                yield portfolio_pb2.VariantChunk(offset=offset, data=data, total_size=entry.size_bytes,
                                                 sha256=entry.variant_id)
                self._on_bytes_sent(len(data))
                offset += len(data)
