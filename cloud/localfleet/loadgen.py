"""A closed-loop inference load generator: phases of N concurrent clients per edge, real images."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from common.security import Transport
from common.wire import to_proto
from protos import inference_pb2, inference_pb2_grpc


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    clients: int  # concurrent closed-loop clients per edge
    think_s: float = 0.0  # pause between a client's requests

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.clients < 1 or self.think_s < 0:
            raise ValueError(f"phase {self.name}: seconds and clients must be positive, think_s >= 0")


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started, at completion
    edge: str
    phase: str
    latency_ms: float
    variant_id: str
    code: str


class LoadGenerator:
    def __init__(
        self,
        edges: dict[str, str],
        images: np.ndarray,
        batch: int,
        transport: Transport,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 10.0,
    ):
        self._stubs = {
            name: inference_pb2_grpc.InferenceServiceStub(transport.for_edges().channel(addr))  # never the token
            for name, addr in edges.items()
        }
        self._images, self._batch, self._clock, self._timeout = images, batch, clock, timeout_s
        self._lock = threading.Lock()
        self.samples: list[Sample] = []

    def _client(self, edge: str, phase: Phase, start: float, end: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        stub = self._stubs[edge]
        while self._clock() < end:
            idx = rng.integers(0, len(self._images), self._batch)
            request = inference_pb2.PredictRequest(input=to_proto(self._images[idx]))
            t0 = self._clock()
            try:
                reply = stub.Predict(request, timeout=self._timeout)
                variant, code = reply.variant_id, "OK"
            except grpc.RpcError as err:
                variant, code = "", err.code().name
            t1 = self._clock()
            with self._lock:
                self.samples.append(Sample(t1 - start, edge, phase.name, (t1 - t0) * 1e3, variant, code))
            if phase.think_s:
                time.sleep(phase.think_s)

    def run(self, phases: Sequence[Phase], on_phase: Callable[[Phase], None] = lambda p: None) -> None:
        start = self._clock()
        for number, phase in enumerate(phases):
            on_phase(phase)
            end = self._clock() + phase.seconds
            threads = [
                threading.Thread(target=self._client, args=(edge, phase, start, end, 1000 * number + i), daemon=True)
                for edge in self._stubs
                for i in range(phase.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
