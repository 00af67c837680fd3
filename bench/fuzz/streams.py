"""Crafted download streams at the edge fetcher: chunks whose offset, declared size, id or data are
wrong, streams cut short or running past the end. Whatever a cloud sends, `edge.fetcher.fetch` either
returns a file that hashes to its id or raises `FetchError`, and the cache holds nothing but the
verified file and the download in progress (`<id>.safetensors`, `<id>.part`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from hypothesis import strategies as st

from common.files import sha256_bytes, sha256_file
from edge.fetcher import FetchError, RetryConfig, fetch
from protos import portfolio_pb2

CHUNK = 4096
FIELDS = ("offset", "total_size", "sha256", "data", "stop", "extra")


def scripts(size: int) -> st.SearchStrategy[list[tuple[int, str, int]]]:
    """Damage to apply to the right stream: (chunk index, what, a number to damage it with)."""
    chunks = max(1, -(-size // CHUNK))
    return st.lists(
        st.tuples(
            st.integers(0, chunks),
            st.sampled_from(FIELDS),
            st.one_of(st.integers(-3, 3), st.integers(-(1 << 63), (1 << 63) - 1)),
        ),
        max_size=3,
    )


class CraftedCloud:
    """A PortfolioService stub that streams the file from the requested offset, damaged by the script."""

    def __init__(self, data: bytes, script: list[tuple[int, str, int]]):
        self._data, self._script, self._id = data, script, sha256_bytes(data)

    def _chunk(self, index: int, offset: int, damage: list[tuple[str, int]]) -> portfolio_pb2.VariantChunk | None:
        chunk = portfolio_pb2.VariantChunk(
            offset=offset, data=self._data[offset : offset + CHUNK], total_size=len(self._data), sha256=self._id
        )
        for what, number in damage:
            if what == "stop":
                return None
            if what == "offset" or what == "total_size":
                setattr(chunk, what, max(-(1 << 63), min((1 << 63) - 1, getattr(chunk, what) + number)))
            elif what == "sha256":
                chunk.sha256 = sha256_bytes(str(number).encode())
            elif what == "data" and chunk.data:
                chunk.data = chunk.data[:-1] + bytes([(chunk.data[-1] + number) % 256])
        return chunk

    def FetchVariant(self, request, timeout=None):
        offset, index = request.offset, 0
        while offset < len(self._data) or any(i == index and w == "extra" for i, w, _ in self._script):
            damage = [(w, n) for i, w, n in self._script if i == index]
            chunk = self._chunk(index, offset, damage)
            if chunk is None:
                return
            yield chunk
            offset, index = offset + max(len(chunk.data), 1), index + 1
            if index > len(self._data) // CHUNK + 2:
                return


def check_stream(data: bytes, script: list[tuple[int, str, int]], folder: Path) -> str | None:
    """The problem with how the fetcher took this stream, or None."""
    shutil.rmtree(folder, ignore_errors=True)
    cache = folder / "cache"
    variant_id = sha256_bytes(data)
    try:
        path = fetch(
            CraftedCloud(data, script),
            variant_id,
            cache,
            retry=RetryConfig(attempts=2, backoff_s=0.0),
            sleep=lambda s: None,
        )
        if sha256_file(path) != variant_id:
            return "the fetcher returned a file that is not its id"
    except FetchError:
        pass
    except Exception as err:
        return f"{type(err).__name__} escaped the fetcher: {err}"
    allowed = {f"{variant_id}.safetensors", f"{variant_id}.part"}
    made = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    stray = made - {"cache"} - {f"cache/{name}" for name in allowed}
    final = cache / f"{variant_id}.safetensors"
    if stray or (final.exists() and sha256_file(final) != variant_id):
        return f"the cache holds {sorted(stray) or final.name} after the stream"
    return None
