"""InferenceService: a thin servicer over the runtime, with health and reflection."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.wire import SERVER_OPTIONS, TensorError, from_proto, to_proto
from edge.metrics import EdgeMetrics
from edge.runtime import NotReadyError, Runtime
from edge.telemetry import RequestWindow
from protos import inference_pb2, inference_pb2_grpc

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, runtime: Runtime, window: RequestWindow, metrics: EdgeMetrics):
        self._runtime, self._window, self._metrics = runtime, window, metrics

    def _finish(self, start: float, variant: str, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - start
        ok = code == grpc.StatusCode.OK
        self._window.record(elapsed, ok)
        self._metrics.request(variant, code.name, elapsed if ok else None)

    def Predict(self, request, context):
        start = time.perf_counter()
        try:
            logits, variant = self._runtime.predict(from_proto(request.input))
        except TensorError as err:
            self._finish(start, "", grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except NotReadyError as err:
            self._finish(start, "", grpc.StatusCode.UNAVAILABLE)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        self._finish(start, variant, grpc.StatusCode.OK)
        return inference_pb2.PredictResponse(output=to_proto(logits), variant_id=variant)


def make_server(servicer: InferenceServicer, host: str, port: int, workers: int
                ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started server (NOT_SERVING until the caller says so) and its bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    for name in ("", INFERENCE_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    return server, bound, health_servicer
