"""`VariantChunk` in its wire format, written with one copy of the file's bytes and read with none.

A download moves the whole variant file through `VariantChunk` messages. The protobuf runtime copies a
chunk's data into a message and again out of it: every access to `chunk.data` of a parsed chunk
makes a fresh copy of its bytes, which costs far more than the parse itself (measured).
`encode_chunk` writes the message's fields before the data (the cloud's sender); `decode_chunk` reads one
into a `ChunkView` whose `data` is a view of the received bytes (the edge's receiver). Both follow
protobuf's encoding rules for this message: any field order, unknown fields skipped, the last
occurrence of a field winning, int64 as two's complement; anything else malformed raises
`ChunkError`. Tests check both against the protobuf runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import PrunefleetError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
FIELDS = {1: ("offset", VARINT), 2: ("data", LENGTH), 3: ("total_size", VARINT), 4: ("sha256", LENGTH)}


class ChunkError(PrunefleetError, ValueError):
    """Bytes that are not a VariantChunk; the message says where they break."""


@dataclass(frozen=True)
class ChunkView:
    """A VariantChunk's fields, `data` a view into the message it was read from."""

    offset: int
    data: memoryview
    total_size: int
    sha256: str


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(offset: int, data: bytes, total_size: int, sha256: str) -> bytes:
    """`VariantChunk(offset=, data=, total_size=, sha256=)` in protobuf's encoding, with `data` copied
    once and written last (zero values left out): a link that dies after the last data byte has crossed
    leaves the edge a whole message (gRPC hands over only whole ones). Sizes and offsets are >= 0."""
    digest = sha256.encode()
    head = (
        (b"\x08" + _varint(offset) if offset else b"")
        + (b"\x18" + _varint(total_size) if total_size else b"")
        + (b"\x22" + _varint(len(digest)) + digest if digest else b"")
        + (b"\x12" + _varint(len(data)) if data else b"")
    )
    return b"".join((head, data))


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw):
            raise ChunkError(f"a varint runs past the end of the {len(raw)}-byte message")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ChunkError(f"a varint at byte {pos} is longer than 10 bytes")


def _skip(raw: bytes, pos: int, wire: int) -> int:
    """The position after an unknown field's value."""
    if wire == VARINT:
        return _read_varint(raw, pos)[1]
    width = {FIXED64: 8, FIXED32: 4}.get(wire)
    if wire == LENGTH:
        width, pos = _read_varint(raw, pos)
    if width is None:
        raise ChunkError(f"wire type {wire} at byte {pos} is not one protobuf uses")
    if pos + width > len(raw):
        raise ChunkError(f"a field of {width} bytes at byte {pos} runs past the end of the message")
    return pos + width


def chunk_prefix(raw: bytes) -> tuple[int, int]:
    """The offset and the number of data bytes in the first `len(raw)` bytes of a VariantChunk that
    `encode_chunk` wrote (data last): what of a chunk crossed a link that broke mid-message. The data
    count is 0 when the prefix ends before the data starts."""
    pos, offset = 0, 0
    while pos < len(raw):
        try:
            key, after = _read_varint(raw, pos)
            value, after = _read_varint(raw, after)
        except ChunkError:  # the prefix ends inside a field's key or value
            return offset, 0
        if key == 0x08:
            offset = value
        elif key == 0x12:
            return offset, min(value, len(raw) - after)
        elif key == 0x22:
            after += value
        elif key != 0x18:
            raise ChunkError(f"field key {key} at byte {pos} is not one encode_chunk writes")
        pos = after
    return offset, 0


def decode_chunk(raw: bytes) -> ChunkView:
    """The VariantChunk encoded in `raw` (zero values for absent fields); `data` is not copied."""
    view, pos = memoryview(raw), 0
    values: dict[str, object] = {"offset": 0, "data": view[0:0], "total_size": 0, "sha256": view[0:0]}
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        number, wire = key >> 3, key & 7
        if number not in FIELDS:
            if number == 0:
                raise ChunkError(f"field number 0 at byte {pos}")
            pos = _skip(raw, pos, wire)
            continue
        name, expected = FIELDS[number]
        if wire != expected:
            raise ChunkError(f"field {name} has wire type {wire}, expected {expected}")
        if wire == VARINT:
            value, pos = _read_varint(raw, pos)
            values[name] = value - (1 << 64) if value >= 1 << 63 else value  # int64: two's complement
        else:
            size, start = _read_varint(raw, pos)
            pos = start + size
            if pos > len(raw):
                raise ChunkError(f"field {name} declares {size} bytes, more than the message holds")
            values[name] = view[start:pos]
    try:
        sha256 = str(values["sha256"], "utf-8")
    except UnicodeDecodeError as err:
        raise ChunkError(f"field sha256 is not UTF-8: {err}") from err
    return ChunkView(values["offset"], values["data"], values["total_size"], sha256)
