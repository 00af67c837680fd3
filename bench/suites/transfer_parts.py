"""The transfers the transfer suite times: one FetchVariant stream read as an edge reads it, and the
raw-TCP baseline of the same bytes, in alternating rounds.

Both clients drop what they receive (transport only: no disk, no hash), so the ratio of their
throughputs is what gRPC, its framing and the chunked protocol cost against the bare socket.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from pathlib import Path

from common.wire import CHUNK_BYTES
from edge.fetcher import portfolio_stub
from protos import portfolio_pb2


def stream_seconds(channel, variant_id: str, size: int) -> float:
    """One FetchVariant stream of the whole file, read chunk by chunk as the edge reads it (each chunk's
    data a view of the message) and dropped; timed from the call to the last chunk."""
    stub = portfolio_stub(channel)
    start, received = time.perf_counter(), 0
    for chunk in stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id=variant_id), timeout=300):
        received += len(chunk.data)
    elapsed = time.perf_counter() - start
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    return elapsed


def _raw_server(path: str, ports, repeats: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    for _ in range(repeats):
        connection, _ = listener.accept()
        with connection, open(path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                connection.sendall(data)


class RawSender:
    """A process that serves the file `repeats` times over raw loopback TCP, one connection each. It
    reads the file in the same chunk size as the cloud, so the two senders differ only in the transport."""

    def __init__(self, path: Path, repeats: int):
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self._process = context.Process(target=_raw_server, args=(str(path), ports, repeats))
        self._process.start()
        self._port = ports.get(timeout=120)
        self._buffer = bytearray(CHUNK_BYTES)

    def seconds(self, size: int) -> float:
        """One transfer, timed from connect to the last byte."""
        start, received = time.perf_counter(), 0
        with socket.create_connection(("127.0.0.1", self._port)) as connection:
            while received < size and (n := connection.recv_into(self._buffer)):
                received += n
        elapsed = time.perf_counter() - start
        if received != size:
            raise RuntimeError(f"raw TCP received {received} of {size} bytes")
        return elapsed

    def close(self) -> None:
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def paired_seconds(channel, variant_id: str, path: Path, size: int, repeats: int) -> tuple[list, list]:
    """gRPC and raw TCP transfers in alternating rounds, so a change in the machine's speed during the
    run reaches both alike."""
    raw = RawSender(path, repeats)
    grpc_times, raw_times = [], []
    try:
        for _ in range(repeats):
            grpc_times.append(stream_seconds(channel, variant_id, size))
            raw_times.append(raw.seconds(size))
    finally:
        raw.close()
    return grpc_times, raw_times
