"""What of a FetchVariant stream crossed a link before it broke, read from the link's own bytes.

`TcpProxy.cut_after(n, record=True)` keeps the cloud-to-edge bytes of a connection up to a cut. These
are HTTP/2 frames (plaintext gRPC; `hyperframe` parses them), the last one possibly cut short. A
stream's DATA payloads are gRPC messages, each a 5-byte prefix (compressed flag, length) and a
VariantChunk; the last one possibly cut short too. `crossed_chunks` gives, for every chunk that
started to cross, its offset in the file and how many of its data bytes crossed, so a benchmark can
count the file bytes a resumed download sent a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperframe.frame import DataFrame, Frame

from common.chunks import chunk_prefix, decode_chunk

FRAME_HEADER = 9
MESSAGE_PREFIX = 5


@dataclass(frozen=True)
class Crossed:
    """One VariantChunk that started to cross: `data_bytes` of its data, from `offset` in the file."""

    stream_id: int
    offset: int
    data_bytes: int
    whole: bool


def stream_payloads(wire: bytes) -> dict[int, bytes]:
    """The DATA payload of each stream in `wire`, server-to-client bytes of one HTTP/2 connection from a
    frame boundary on; a last frame cut short gives the part of its payload that arrived."""
    view, pos = memoryview(wire), 0
    out: dict[int, bytearray] = {}
    while pos + FRAME_HEADER <= len(wire):
        frame, length = Frame.parse_frame_header(view[pos : pos + FRAME_HEADER])
        body = view[pos + FRAME_HEADER : pos + FRAME_HEADER + length]
        pos += FRAME_HEADER + length
        if not isinstance(frame, DataFrame):
            continue
        data = out.setdefault(frame.stream_id, bytearray())
        if len(body) == length:
            frame.parse_body(body)
            data.extend(frame.data)
        else:  # cut short: the part of its data that arrived (padded: between pad length and padding)
            data.extend(body[1 : length - body[0]] if "PADDED" in frame.flags and body else body)
    return {stream: bytes(data) for stream, data in out.items()}


def crossed_chunks(wire: bytes) -> list[Crossed]:
    """Every VariantChunk of every stream in `wire` (see `stream_payloads`), whole or cut short."""
    out: list[Crossed] = []
    for stream, payload in stream_payloads(wire).items():
        pos = 0
        while pos + MESSAGE_PREFIX <= len(payload):  # a cut prefix carried no file bytes
            size = int.from_bytes(payload[pos + 1 : pos + MESSAGE_PREFIX], "big")
            message = payload[pos + MESSAGE_PREFIX : pos + MESSAGE_PREFIX + size]
            if len(message) == size:
                chunk = decode_chunk(message)
                out.append(Crossed(stream, chunk.offset, len(chunk.data), True))
            else:
                out.append(Crossed(stream, *chunk_prefix(message), False))
            pos += MESSAGE_PREFIX + size
    return out


def file_bytes_in(crossed: list[Crossed], start: int, end: int) -> int:
    """How many file bytes in [start, end) the crossed chunks carried."""
    return sum(max(0, min(end, c.offset + c.data_bytes) - max(start, c.offset)) for c in crossed)
