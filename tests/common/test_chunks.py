"""VariantChunk's wire format, written and read by hand: what the protobuf runtime writes (the data
field last) and reads, the data never copied on the way in, and anything malformed refused by name."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.chunks import ChunkError, decode_chunk, encode_chunk
from protos import portfolio_pb2

OFFSETS = st.integers(0, 1 << 62)
DIGESTS = st.sampled_from(["", "ab" * 32])


@settings(max_examples=300, deadline=None)
@given(offset=OFFSETS, data=st.binary(max_size=300), total_size=OFFSETS, sha256=DIGESTS)
def test_encoded_chunks_are_the_messages_own_wire_bytes_with_the_data_last(offset, data, total_size, sha256):
    raw = encode_chunk(offset, data, total_size, sha256)
    header = portfolio_pb2.VariantChunk(offset=offset, total_size=total_size, sha256=sha256)
    assert raw == header.SerializeToString() + portfolio_pb2.VariantChunk(data=data).SerializeToString()
    assert raw.endswith(data)
    expected = portfolio_pb2.VariantChunk(offset=offset, data=data, total_size=total_size, sha256=sha256)
    assert portfolio_pb2.VariantChunk.FromString(raw) == expected


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(-(1 << 63), (1 << 63) - 1),
    data=st.binary(max_size=300),
    total_size=st.integers(-(1 << 63), (1 << 63) - 1),
    sha256=st.text(max_size=70),
    order=st.permutations([1, 2, 3, 4]),
    unknown=st.binary(max_size=20),
)
def test_decoding_reads_what_the_protobuf_runtime_reads(offset, data, total_size, sha256, order, unknown):
    """Fields in any order and unknown fields between them, as protobuf allows."""
    parts = {
        1: portfolio_pb2.VariantChunk(offset=offset),
        2: portfolio_pb2.VariantChunk(data=data),
        3: portfolio_pb2.VariantChunk(total_size=total_size),
        4: portfolio_pb2.VariantChunk(sha256=sha256),
    }
    extra = b"\x2a" + bytes([len(unknown)]) + unknown + b"\x30\x96\x01" + b"\x39" + bytes(8) + b"\x45" + bytes(4)
    raw = extra + b"".join(parts[number].SerializeToString() for number in order)
    want = portfolio_pb2.VariantChunk.FromString(raw)
    got = decode_chunk(raw)
    assert (got.offset, bytes(got.data), got.total_size, got.sha256) == (
        want.offset,
        want.data,
        want.total_size,
        want.sha256,
    )


def test_the_data_is_a_view_of_the_message_and_the_last_occurrence_wins():
    raw = encode_chunk(7, b"first", 100, "ab" * 32) + portfolio_pb2.VariantChunk(data=b"second").SerializeToString()
    chunk = decode_chunk(raw)
    assert chunk.data.obj is raw and bytes(chunk.data) == b"second" and chunk.offset == 7
    assert decode_chunk(b"") == decode_chunk(b"")  # every field absent: zero values
    assert (decode_chunk(b"").offset, bytes(decode_chunk(b"").data), decode_chunk(b"").sha256) == (0, b"", "")


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"\x08", "varint runs past the end"),
        (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x12\x05abc", "declares 5 bytes"),
        (b"\x10\x01", "wire type 0, expected 2"),
        (b"\x0a\x00", "wire type 2, expected 0"),
        (b"\x2b", "wire type 3"),
        (b"\x29\x00", "runs past the end"),
        (b"\x00\x01", "field number 0"),
        (b"\x22\x02\xff\xfe", "not UTF-8"),
    ],
)
def test_bytes_that_are_no_chunk_are_refused_by_name(raw, problem):
    with pytest.raises(ChunkError, match=problem):
        decode_chunk(raw)
