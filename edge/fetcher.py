"""Fetch variant files into a content-addressed cache: resumable, verified, atomic.

    CACHE/<sha256>.safetensors   complete and verified
    CACHE/<sha256>.part          a download in progress; the next fetch resumes from its size
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

from common.files import fsync_dir, is_sha256_hex, sha256_file
from common.variant import MAX_VARIANT_BYTES
from protos import portfolio_pb2

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A download that failed verification or could not complete."""


@dataclass(frozen=True)
class FetchConfig:
    deadline_s: float = 300.0
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.attempts < 1 or self.backoff_s < 0:
            raise ValueError("deadline_s must be positive, attempts >= 1, backoff_s >= 0")


def cached_path(cache: Path, variant_id: str) -> Path:
    if not is_sha256_hex(variant_id):
        raise FetchError(f"variant id {variant_id[:80]!r} is not a sha256 hex string")
    return cache / f"{variant_id}.safetensors"


def _stream_into(stub, variant_id: str, part: Path, deadline_s: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = portfolio_pb2.FetchVariantRequest(variant_id=variant_id, offset=offset)
    with open(part, "ab") as f:
        for chunk in stub.FetchVariant(request, timeout=deadline_s):
            if chunk.sha256 != variant_id or chunk.offset != offset:
                raise FetchError(f"chunk for {chunk.sha256[:12]} at offset {chunk.offset}, expected "
                                 f"{variant_id[:12]} at {offset}")
            if chunk.total_size > MAX_VARIANT_BYTES or offset + len(chunk.data) > chunk.total_size:
                raise FetchError(f"variant {variant_id[:12]} declares {chunk.total_size} bytes, beyond the limit "
                                 "or its own data")
            f.write(chunk.data)
            offset += len(chunk.data)
        f.flush()
        os.fsync(f.fileno())


def _finish(part: Path, final: Path, variant_id: str) -> None:
    digest = sha256_file(part)
    if digest != variant_id:
        part.unlink(missing_ok=True)
        raise FetchError(f"downloaded file hashes to {digest[:12]}, not {variant_id[:12]}; discarded")
    os.replace(part, final)
    fsync_dir(final.parent)


def fetch_once(stub, variant_id: str, cache: Path, deadline_s: float) -> Path:
    final = cached_path(cache, variant_id)
    if final.exists():
        if sha256_file(final) == variant_id:
            return final
        log.warning("cached %s is corrupt; fetching again", final.name)
        final.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".part")
    _stream_into(stub, variant_id, part, deadline_s)
    _finish(part, final, variant_id)
    return final


def fetch(stub, variant_id: str, cache: Path, config: FetchConfig,
          sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> Path:
    """Fetch with retries: exponential backoff with full jitter between attempts."""
    cached_path(cache, variant_id)  # refuse a bad id before any I/O
    rng = rng or random.Random()
    for attempt in range(1, config.attempts + 1):
        try:
            return fetch_once(stub, variant_id, cache, config.deadline_s)
        except (grpc.RpcError, FetchError, OSError) as err:
            permanent = isinstance(err, grpc.RpcError) and err.code() in (
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
            if permanent or attempt == config.attempts:
                raise FetchError(f"fetching {variant_id[:12]} failed after {attempt} attempt(s): {err}") from err
            delay = rng.uniform(0, min(config.max_backoff_s, config.backoff_s * 2 ** (attempt - 1)))
            log.warning("fetching %s failed (%s); retrying in %.1f s", variant_id[:12], err, delay)
            sleep(delay)
    raise AssertionError("unreachable")


