"""The fetcher, through the edge's own stub (chunks read as views), against a real in-process
PortfolioService serving bytes from memory."""

import os
import random
from concurrent import futures

import grpc
import pytest

from common.files import sha256_bytes, sha256_file
from edge.fetcher import FetchError, RetryConfig, fetch, fetch_once, portfolio_stub
from protos import portfolio_pb2, portfolio_pb2_grpc

CHUNK = 1000
DATA = random.Random(0).randbytes(10_500)
SHA = sha256_bytes(DATA)


class MemoryPortfolio(portfolio_pb2_grpc.PortfolioServiceServicer):
    def __init__(self):
        self.files: dict[str, bytes] = {SHA: DATA}
        self.requests: list[tuple[str, int]] = []
        self.fail_after_chunks: int | None = None  # abort the next stream after this many chunks
        self.bad_offset = False

    def FetchVariant(self, request, context):
        self.requests.append((request.variant_id, request.offset))
        data = self.files.get(request.variant_id)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such variant")
        if not 0 <= request.offset <= len(data):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset outside the file")
        for i, offset in enumerate(range(request.offset, len(data), CHUNK)):
            if self.fail_after_chunks is not None and i == self.fail_after_chunks:
                self.fail_after_chunks = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
            yield portfolio_pb2.VariantChunk(
                offset=offset + (7 if self.bad_offset else 0),
                data=data[offset : offset + CHUNK],
                total_size=len(data),
                sha256=request.variant_id,
            )


@pytest.fixture(scope="module")
def served():
    servicer = MemoryPortfolio()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, portfolio_stub(channel)
    channel.close()
    server.stop(0)


@pytest.fixture
def portfolio(served):
    servicer, stub = served
    servicer.__init__()  # a fresh state per test, same server
    return servicer, stub


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def test_full_fetch_lands_verified_and_atomic(portfolio, tmp_path):
    servicer, stub = portfolio
    path = fetch(stub, SHA, tmp_path / "cache", deadline_s=10)
    assert path == tmp_path / "cache" / f"{SHA}.safetensors" and path.read_bytes() == DATA
    assert os.listdir(tmp_path / "cache") == [path.name]  # no .part left behind
    assert servicer.requests == [(SHA, 0)]
    assert fetch(stub, SHA, tmp_path / "cache", deadline_s=10) == path
    assert servicer.requests == [(SHA, 0)]  # the cache answered the second time


def test_resume_requests_only_the_remainder(portfolio, tmp_path):
    servicer, stub = portfolio
    tmp_path.joinpath(f"{SHA}.part").write_bytes(DATA[:4321])
    path = fetch_once(stub, SHA, tmp_path, deadline_s=10)
    assert servicer.requests == [(SHA, 4321)]
    assert sha256_file(path) == SHA


def test_a_dropped_stream_is_retried_from_where_it_stopped(portfolio, tmp_path):
    servicer, stub = portfolio
    servicer.fail_after_chunks = 3
    sleeps = Sleeps()
    path = fetch(
        stub,
        SHA,
        tmp_path,
        deadline_s=10,
        retry=RetryConfig(attempts=3, backoff_s=0.5),
        sleep=sleeps,
        rng=random.Random(1),
    )
    assert servicer.requests == [(SHA, 0), (SHA, 3 * CHUNK)]
    assert path.read_bytes() == DATA
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.5


def test_sha_mismatch_discards_the_part_and_raises(portfolio, tmp_path):
    servicer, stub = portfolio
    corrupt = bytearray(DATA)
    corrupt[5000] ^= 0xFF
    servicer.files[SHA] = bytes(corrupt)
    with pytest.raises(FetchError, match="hashes to"):
        fetch_once(stub, SHA, tmp_path, deadline_s=10)
    assert list(tmp_path.iterdir()) == []
    sleeps = Sleeps()
    with pytest.raises(FetchError, match="after 3 attempt"):
        fetch(stub, SHA, tmp_path, deadline_s=10, retry=RetryConfig(attempts=3), sleep=sleeps, rng=random.Random(0))
    assert [offset for _, offset in servicer.requests] == [0, 0, 0, 0]  # every retry started over
    assert len(sleeps) == 2 and sleeps[1] <= 1.0 and list(tmp_path.iterdir()) == []


def test_a_corrupt_cached_file_is_fetched_again(portfolio, tmp_path):
    servicer, stub = portfolio
    tmp_path.joinpath(f"{SHA}.safetensors").write_bytes(b"not the file")
    assert fetch_once(stub, SHA, tmp_path, deadline_s=10).read_bytes() == DATA
    assert servicer.requests == [(SHA, 0)]


def test_a_part_longer_than_the_file_is_dropped_and_refetched(portfolio, tmp_path):
    servicer, stub = portfolio
    tmp_path.joinpath(f"{SHA}.part").write_bytes(DATA + b"extra bytes")
    path = fetch(stub, SHA, tmp_path, deadline_s=10, sleep=Sleeps())
    assert path.read_bytes() == DATA and servicer.requests == [(SHA, len(DATA) + 11), (SHA, 0)]


def test_chunks_at_the_wrong_offset_are_refused(portfolio, tmp_path):
    servicer, stub = portfolio
    servicer.bad_offset = True
    with pytest.raises(FetchError, match="offset"):
        fetch_once(stub, SHA, tmp_path, deadline_s=10)
    assert not tmp_path.joinpath(f"{SHA}.safetensors").exists()


def test_unknown_variant_is_not_retried(portfolio, tmp_path):
    _, stub = portfolio
    sleeps = Sleeps()
    with pytest.raises(FetchError, match="NOT_FOUND"):
        fetch(stub, "e" * 64, tmp_path, deadline_s=10, sleep=sleeps)
    assert sleeps == []


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", SHA.upper(), SHA[:63], SHA + "0", "", f"{SHA[:62]}/x"])
def test_bad_ids_are_refused_before_touching_the_filesystem(portfolio, tmp_path, bad_id):
    servicer, stub = portfolio
    cache = tmp_path / "never-created"
    with pytest.raises(FetchError, match="not a sha256"):
        fetch(stub, bad_id, cache, deadline_s=10, sleep=Sleeps())
    assert not cache.exists() and servicer.requests == []


def test_a_stream_of_bytes_that_are_no_chunk_fails_the_call_and_leaves_no_file(tmp_path):
    """A peer whose messages do not parse as VariantChunk: the call ends INTERNAL, and the fetch fails
    after its retries with nothing in the cache."""

    def garbage(request, context):
        yield b"\x12\x05abc"  # data declared 5 bytes long, 3 sent

    handler = grpc.method_handlers_generic_handler(
        "prunefleet.v1.PortfolioService",
        {
            "FetchVariant": grpc.unary_stream_rpc_method_handler(
                garbage,
                request_deserializer=portfolio_pb2.FetchVariantRequest.FromString,
                response_serializer=lambda message: message,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(FetchError, match="INTERNAL"):
                fetch(
                    portfolio_stub(channel), SHA, tmp_path, deadline_s=10, retry=RetryConfig(attempts=2, backoff_s=0.0)
                )
    finally:
        server.stop(0)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == []
