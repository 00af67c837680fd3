"""InferenceService: a thin servicer over the runtime, with health and reflection.

Status codes: a tensor the variant cannot take (dtype, shape, byte count, NaN/Inf) is
INVALID_ARGUMENT with a message naming what is expected; a tensor declared larger than the message
limit is RESOURCE_EXHAUSTED, and so is a message over it (refused by the transport, which names both
sizes) and any RPC beyond `max_pending` in progress; before any variant is active, UNAVAILABLE. A bad
request fails alone: it never reaches the model, and everyone else is served meanwhile.

Describe answers with the active variant's spec as a client needs it (input shape, normalization, class
names, the batch bound), UNAVAILABLE before any variant is active. It is served by the same server as
Predict, so the same transport (mutual TLS unless the agent runs with --insecure) guards both; it is
neither a request in the telemetry nor an arrival.

With TLS, Predict and Describe are served only to client and operator certificates (`PredictCallers`):
another edge, or the cloud's certificate, is PERMISSION_DENIED. No call to an edge carries the operator
token, and none needs it.

Where a batch-1 Predict's time goes beyond its forward pass (the switching benchmark's gRPC study,
`bench.suites.grpc_steps`, on a 2-core AMD EPYC, ONNX Runtime, a client on loopback; p50s over
several runs): from the client to gRPC handing the call over 0.10 to 0.17 ms, to a worker thread
with the request read 0.07 to 0.12 ms, this handler before and after the forward 0.02 to 0.04 ms
each, the reply back to the client 0.11 to 0.19 ms. The handler's own steps take 11 to 17 us in a
tight loop (`decode` 3.4 to 6, the runtime's validation 2.1 to 3.5, `reply` 2 to 3.4, `finish` 3.5
to 5.5; `decode` is a view of the message's bytes, not a copy), so what is left is gRPC's: a bytes
echo of the same size took 0.20 to 0.39 ms on a sync server whatever its worker threads (1, 2 or 16;
the bound on pending RPCs changed nothing either), and 0.30 to 0.51 ms on a `grpc.aio` server,
slower than the sync one in most runs (faster in one), which is why the server stays synchronous.
The one hand-off of our own, the micro-batcher's, is skipped for a lone request (`edge.batching`).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import PrunefleetError
from common.identity import peer_identity
from common.wire import (
    DTYPES,
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    TensorError,
    from_proto,
    to_proto,
)
from edge.batching import MicroBatcher
from edge.metrics import EdgeMetrics
from edge.runtime import NotReadyError, Runtime
from edge.telemetry import RequestWindow
from protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
PREDICT_METHOD = f"/{INFERENCE_SERVICE}/Predict"
HEALTH_NAMES = ("", INFERENCE_SERVICE)
MAX_CLASS_NAMES_BYTES = MAX_MESSAGE_BYTES // 4  # Describe leaves out names longer in all than this


class PayloadTooLargeError(PrunefleetError, ValueError):
    """A tensor whose declared size is over the message limit."""


def check_declared_size(tensor: inference_pb2.Tensor) -> None:
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None or any(d < 0 for d in tensor.shape):
        return  # from_proto names the problem
    declared = math.prod(tensor.shape) * dtype.itemsize
    if declared > MAX_MESSAGE_BYTES:
        raise PayloadTooLargeError(
            f"shape {list(tensor.shape)} of {tensor.dtype} needs {declared} bytes, over "
            f"the {MAX_MESSAGE_BYTES}-byte limit; send smaller batches"
        )


def describe(runtime: Runtime) -> inference_pb2.DescribeResponse:
    """The active variant as a client needs it; NotReadyError before any variant is active."""
    active = runtime.active
    if active is None:
        raise NotReadyError("this edge serves no variant yet: it has not loaded one from its cloud")
    spec = active.spec
    names_bytes = sum(len(name.encode()) + 4 for name in spec.classes)  # +4: a field's tag and length
    return inference_pb2.DescribeResponse(
        variant_id=active.variant_id,
        name=active.info.name,
        input_shape=list(spec.input_shape),
        mean=list(spec.mean),
        std=list(spec.std),
        num_classes=spec.num_classes,
        classes=list(spec.classes) if names_bytes <= MAX_CLASS_NAMES_BYTES else [],
        max_batch=runtime.config.max_batch,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Predict on the runtime, or through a micro-batcher when one is given."""

    def __init__(
        self, runtime: Runtime, window: RequestWindow, metrics: EdgeMetrics, batcher: MicroBatcher | None = None
    ):
        self._runtime, self._window, self._metrics = runtime, window, metrics
        self._predict = batcher.predict if batcher is not None else runtime.predict

    def finish(self, start: float, variant_id: str, code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
        """Record one request in the telemetry window and the metrics."""
        elapsed = time.perf_counter() - start
        ok = code == grpc.StatusCode.OK
        self._window.record(elapsed, variant_id, ok)
        self._metrics.request(variant_id, code.name, elapsed if ok else None)

    def _fail(self, start: float, context, code: grpc.StatusCode, message: str):
        self.finish(start, "", code)
        context.abort(code, message)

    def decode(self, tensor: inference_pb2.Tensor):
        """The request's tensor as an array (a view of the message's bytes, no copy), its size checked."""
        check_declared_size(tensor)
        try:
            return from_proto(tensor)
        except TensorError as err:
            raise TensorError(f"{err}; {self._runtime.expected_input()}") from err

    @staticmethod
    def reply(logits, variant_id: str) -> inference_pb2.PredictResponse:
        return inference_pb2.PredictResponse(output=to_proto(logits), variant_id=variant_id)

    @property
    def window(self) -> RequestWindow:
        return self._window

    def Predict(self, request, context):
        start = time.perf_counter()
        try:
            logits, variant_id = self._predict(self.decode(request.input))
        except PayloadTooLargeError as err:
            self._fail(start, context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except TensorError as err:
            self._fail(start, context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except NotReadyError as err:
            self._fail(start, context, grpc.StatusCode.UNAVAILABLE, str(err))
        except RuntimeError as err:  # the backend failing on a valid input is our fault, not the caller's
            log.exception("inference failed")
            self._fail(start, context, grpc.StatusCode.INTERNAL, f"inference failed: {err}")
        reply = self.reply(logits, variant_id)
        self.finish(start, variant_id)
        return reply

    def Describe(self, request, context):
        try:
            return describe(self._runtime)
        except NotReadyError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))


class ArrivalCounter(grpc.ServerInterceptor):
    """Counts each Predict as gRPC hands the call over: interceptors run on gRPC's serving thread, before
    the call waits for a worker thread, so requests queued inside gRPC count as come too."""

    def __init__(self, window: RequestWindow):
        self._window = window

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method == PREDICT_METHOD:
            self._window.arrive()
        return continuation(handler_call_details)


class PredictCallers(grpc.ServerInterceptor):
    """InferenceService calls only from client or operator certificates (TLS); others pass through."""

    ROLES = ("client", "operator")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{INFERENCE_SERVICE}/"):
            return handler
        behavior = handler.unary_unary

        def checked(request, context):
            caller = peer_identity(context)
            if caller is None or caller.role not in self.ROLES:
                who = caller.uri if caller else "no prunefleet identity"
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this edge serves client certificates, not {who}")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, handler.request_deserializer, handler.response_serializer)


def set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_NAMES:
        health_servicer.set(name, status)


def make_server(
    servicer: InferenceServicer,
    host: str,
    port: int,
    workers: int,
    credentials: grpc.ServerCredentials | None = None,
    max_pending: int | None = None,
    interceptors: tuple[grpc.ServerInterceptor, ...] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started server, NOT_SERVING until the caller says otherwise, and its bound port (port 0 picks one).
    With `credentials` it speaks TLS and serves only client and operator certificates; without, plaintext.
    `workers` threads take RPCs; beyond
    `max_pending` RPCs in progress (queued ones included), gRPC answers RESOURCE_EXHAUSTED at once
    instead of letting a queue grow without bound. `interceptors` run after the agent's own (a
    benchmark's timing stamps)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict"),
        interceptors=(ArrivalCounter(servicer.window), *([PredictCallers()] if credentials else []), *interceptors),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=max_pending,
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"{host}:{port}"
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as err:  # grpc raises when the address is taken
        raise OSError(f"cannot bind {host}:{port}: {err}") from err
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    set_serving(health_servicer, False)
    server.start()
    return server, bound, health_servicer
