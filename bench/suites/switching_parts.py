"""Pieces of the switching benchmark: percentiles, and an InferenceService on loopback with clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from common.files import short_id
from common.wire import GRPC_OPTIONS, from_proto
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime
from edge.server import InferenceServicer, make_server, set_serving
from edge.telemetry import RequestWindow
from protos import inference_pb2_grpc


def percentiles(samples: list[float]) -> dict:
    p50, p95, p99 = np.percentile(np.asarray(samples), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(samples)), "n": len(samples)}


class Served:
    """The runtime behind a real gRPC server on loopback, and a channel to it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __enter__(self) -> Served:
        servicer = InferenceServicer(
            self.runtime, RequestWindow(time.monotonic()), EdgeMetrics(CollectorRegistry(), "bench", slo_s=0.05)
        )
        self.server, port, health = make_server(servicer, "127.0.0.1", 0, workers=8)
        set_serving(health, True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        self.server.stop(0).wait()

    def hammer(self, clients: int, request, expected: dict, work: Callable[[], int]) -> dict:
        """Clients send `request` until `work` returns; each answer must equal `expected[variant_id]`."""
        stop, lock = threading.Event(), threading.Lock()
        counts = {"answered": 0, "failed": 0, "wrong": 0, "by_variant": {}}

        def client():
            while not stop.is_set():
                try:
                    reply = self.stub.Predict(request, timeout=30)
                    ok = np.allclose(from_proto(reply.output), expected[reply.variant_id], atol=1e-4)
                    with lock:
                        counts["answered"] += 1
                        counts["wrong"] += not ok
                        counts["by_variant"][short_id(reply.variant_id)] = (
                            counts["by_variant"].get(short_id(reply.variant_id), 0) + 1
                        )
                except grpc.RpcError:
                    with lock:
                        counts["failed"] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            counts["switches"] = work()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        return counts
