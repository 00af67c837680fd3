"""Fetch variant files into a content-addressed cache: resumable, verified, atomic.

    CACHE/<sha256>.safetensors   complete and verified (a variant file, what the torch backend serves)
    CACHE/<sha256>.onnx          complete and verified (an ONNX file, what the ONNX Runtime backend serves)
    CACHE/<sha256>.part          a download in progress; the next fetch resumes from its size

A file's id is its sha256 (a variant id, or a member's ONNX file id); anything else is refused before
the filesystem is touched. A .part whose hash does not match once complete is deleted, so the retry
starts from zero. Chunks are read as `common.chunks.ChunkView`s (`portfolio_stub`): their data goes to
the file straight from the received message, not through a copy in a protobuf object.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.chunks import ChunkView, decode_chunk
from common.errors import PrunefleetError
from common.files import fsync_dir, is_sha256_hex, sha256_file, short_id
from common.variant_spec import MAX_VARIANT_BYTES
from edge.backoff import full_jitter
from protos import portfolio_pb2, portfolio_pb2_grpc

log = logging.getLogger(__name__)
PERMANENT = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
)


class FetchError(PrunefleetError, RuntimeError):
    """A download that failed verification or could not complete; the message says why."""


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = 5
    backoff_s: float = 0.5  # the first retry waits up to this long; each next one up to twice as long
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("attempts must be >= 1 and 0 <= backoff_s <= max_backoff_s")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return full_jitter(attempt, self.backoff_s, self.max_backoff_s, rng)


def portfolio_stub(channel: grpc.Channel) -> portfolio_pb2_grpc.PortfolioServiceStub:
    """A PortfolioService stub whose FetchVariant yields `ChunkView`s: each chunk's data is a view of
    the message as received. Bytes that are not a VariantChunk end the call with INTERNAL."""
    stub = portfolio_pb2_grpc.PortfolioServiceStub(channel)
    stub.FetchVariant = channel.unary_stream(
        f"/{portfolio_pb2.DESCRIPTOR.services_by_name['PortfolioService'].full_name}/FetchVariant",
        request_serializer=portfolio_pb2.FetchVariantRequest.SerializeToString,
        response_deserializer=decode_chunk,
    )
    return stub


SUFFIXES = (".safetensors", ".onnx")


def cached_path(cache_dir: Path, variant_id: str, suffix: str = ".safetensors") -> Path:
    if not is_sha256_hex(variant_id):
        raise FetchError(f"variant id {variant_id[:80]!r} is not a sha256 hex string (64 lowercase hex digits)")
    if suffix not in SUFFIXES:
        raise FetchError(f"suffix {suffix[:20]!r} is not one of {', '.join(SUFFIXES)}")
    return Path(cache_dir) / f"{variant_id}{suffix}"


def _check_chunk(chunk: ChunkView | portfolio_pb2.VariantChunk, variant_id: str, offset: int, total: int | None) -> int:
    if chunk.sha256 != variant_id or chunk.offset != offset:
        raise FetchError(
            f"chunk of {short_id(chunk.sha256)!r} at offset {chunk.offset}, expected {short_id(variant_id)} at {offset}"
        )
    if total is not None and chunk.total_size != total:
        raise FetchError(f"total size changed from {total} to {chunk.total_size} mid-stream")
    if chunk.total_size > MAX_VARIANT_BYTES or offset + len(chunk.data) > chunk.total_size:
        raise FetchError(
            f"variant {short_id(variant_id)} declares {chunk.total_size} bytes: over the "
            f"{MAX_VARIANT_BYTES}-byte limit or short of its own data"
        )
    return chunk.total_size


def _stream_into(stub, variant_id: str, part: Path, deadline_s: float) -> None:
    """Append the rest of the file to `part`, resuming from its size."""
    offset = part.stat().st_size if part.exists() else 0
    request = portfolio_pb2.FetchVariantRequest(variant_id=variant_id, offset=offset)
    total = None
    with open(part, "ab") as f:
        try:
            for chunk in stub.FetchVariant(request, timeout=deadline_s):
                total = _check_chunk(chunk, variant_id, offset, total)
                f.write(chunk.data)
                offset += len(chunk.data)
        finally:
            f.flush()
            os.fsync(f.fileno())
    if total is not None and offset != total:
        raise FetchError(f"stream of {short_id(variant_id)} ended at byte {offset} of {total}")


def _finish(part: Path, final: Path, variant_id: str) -> None:
    digest = sha256_file(part)
    if digest != variant_id:
        part.unlink(missing_ok=True)
        raise FetchError(f"downloaded file hashes to {short_id(digest)}, not {short_id(variant_id)}; discarded")
    os.replace(part, final)
    fsync_dir(final.parent)


def fetch_once(stub, variant_id: str, cache_dir: Path, deadline_s: float, suffix: str = ".safetensors") -> Path:
    """One attempt: the cached file if it verifies, else stream (resuming), verify and rename."""
    final = cached_path(cache_dir, variant_id, suffix)
    if final.exists():
        if sha256_file(final) == variant_id:
            return final
        log.warning("cached %s is corrupt; fetching it again", final.name)
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".part")
    if part.exists() and part.stat().st_size > MAX_VARIANT_BYTES:
        part.unlink()
    try:
        _stream_into(stub, variant_id, part, deadline_s)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.OUT_OF_RANGE:  # our .part is longer than the file: start over
            part.unlink(missing_ok=True)
        raise
    _finish(part, final, variant_id)
    return final


def fetch(
    stub,
    variant_id: str,
    cache_dir: Path,
    deadline_s: float = 300.0,
    *,
    retry: RetryConfig = RetryConfig(),
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    suffix: str = ".safetensors",
) -> Path:
    """The verified path of a file (`CACHE/<id><suffix>`), fetched through `stub` (`portfolio_stub`, or
    any stub whose FetchVariant yields VariantChunk-like messages) if needed.

    Every attempt's stream has `deadline_s`; failed attempts are retried with exponential backoff and
    full jitter, except for errors no retry can fix (bad id, unknown variant)."""
    cached_path(cache_dir, variant_id, suffix)  # refuse a bad id before any I/O
    rng = rng or random.Random()
    for attempt in range(1, retry.attempts + 1):
        try:
            return fetch_once(stub, variant_id, cache_dir, deadline_s, suffix)
        except (grpc.RpcError, FetchError, OSError) as err:
            permanent = isinstance(err, grpc.RpcError) and err.code() in PERMANENT
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            if permanent or attempt == retry.attempts:
                raise FetchError(
                    f"fetching {short_id(variant_id)} failed after {attempt} attempt(s): {detail}"
                ) from err
            delay = retry.delay(attempt, rng)
            log.warning("fetching %s failed (%s); retrying in %.2f s", short_id(variant_id), detail, delay)
            sleep(delay)
    raise AssertionError("unreachable")
