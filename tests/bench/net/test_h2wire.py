"""Reading what of a FetchVariant stream crossed a link, from HTTP/2 frames cut at every byte."""

import random

from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, SettingsFrame

from bench.net.h2wire import crossed_chunks, file_bytes_in, stream_payloads
from common.chunks import chunk_prefix, encode_chunk

SHA = "ab" * 32


def _stream(file: bytes, chunk: int) -> tuple[bytes, list[int]]:
    """The gRPC messages of a FetchVariant stream of `file`, and for each byte the file byte it carries
    (-1 for framing)."""
    payload, owner = bytearray(), []
    for offset in range(0, len(file), chunk):
        data = file[offset : offset + chunk]
        message = encode_chunk(offset, data, len(file), SHA)
        start = message.index(data)  # the data sits after the offset and its own length
        payload += b"\x00" + len(message).to_bytes(4, "big") + message
        owner += (
            [-1] * (5 + start) + list(range(offset, offset + len(data))) + [-1] * (len(message) - start - len(data))
        )
    return bytes(payload), owner


def _frames(payload: bytes, owner: list[int], rng: random.Random) -> tuple[bytes, list[int]]:
    """`payload` in DATA frames of random sizes (some padded) on stream 1, after a SETTINGS and a HEADERS
    frame, with PINGs and another stream's DATA between them; each wire byte's file byte."""
    wire, where = bytearray(), []

    def put(frame, owners=()):
        raw = frame.serialize()
        wire.extend(raw)
        where.extend(owners or [-1] * len(raw))

    put(SettingsFrame(0))
    put(HeadersFrame(1, data=b"\x88"))
    pos = 0
    while pos < len(payload):
        size = rng.randint(1, 60)
        frame = DataFrame(1, data=payload[pos : pos + size])
        padding = rng.choice([0, 0, 3])
        if padding:
            frame.flags.add("PADDED")
            frame.pad_length = padding
        raw = frame.serialize()
        put(frame, [-1] * (9 + bool(padding)) + owner[pos : pos + size] + [-1] * padding)
        assert len(where) == len(wire), raw
        pos += size
        if rng.random() < 0.2:
            put(PingFrame(0, opaque_data=b"12345678"))
        if rng.random() < 0.1:
            put(DataFrame(3, data=b"not a chunk"))  # another stream's bytes are kept apart
    return bytes(wire), where


def test_crossed_file_bytes_match_the_wire_at_every_cut():
    rng = random.Random(7)
    file = bytes(rng.randrange(256) for _ in range(250))
    payload, owner = _stream(file, chunk=64)
    wire, where = _frames(payload, owner, rng)
    assert stream_payloads(wire)[1] == payload
    for cut in range(len(wire) + 1):
        crossed = [c for c in crossed_chunks(wire[:cut]) if c.stream_id == 1]
        arrived = {b for b in where[:cut] if b >= 0}
        assert file_bytes_in(crossed, 0, len(file)) == len(arrived), cut
        whole = [c for c in crossed if c.whole]
        assert [c.offset for c in whole] == list(range(0, 64 * len(whole), 64))
        assert sum(not c.whole for c in crossed) <= 1
        # bytes from the resume point on: only the chunk the cut broke
        resume = 64 * len(whole)
        assert file_bytes_in(crossed, resume, len(file)) == len(arrived) - min(resume, len(file))


def test_chunk_prefix_reads_the_offset_and_the_data_that_arrived():
    message = encode_chunk(3 << 20, b"x" * 300, 64 << 20, SHA)
    assert chunk_prefix(message[:1]) == (0, 0)  # inside the offset's field
    data_at = message.index(b"x")
    assert chunk_prefix(message[:data_at]) == (3 << 20, 0)
    assert chunk_prefix(message[: data_at + 17]) == (3 << 20, 17)
    assert chunk_prefix(message) == (3 << 20, 300)
    assert chunk_prefix(message[: message.index(SHA.encode()) + 10]) == (3 << 20, 0)  # inside the digest
    short = encode_chunk(0, b"y" * 5, 5, SHA)  # offset 0 is left out
    assert chunk_prefix(short[: len(short) - 3]) == (0, 2)
