"""The switching benchmark's gRPC overhead study: where a batch-1 Predict's time goes beyond the forward pass.

Three views of the edge's serving path, each on the runtime of one backend with its smallest variant
active (`bench.suites.switching` runs it per backend):

- `per_request`: real Predicts over gRPC on loopback to the edge's own server (`edge.server.make_server`,
  the agent's interceptors), one at a time, each stamped where it passes: sent by the client, handed
  over by gRPC's serving thread (an interceptor), started and ended on a worker thread (the handler),
  the forward pass's own start and end (the variant's `forward`, timed), received by the client. The
  overhead of a request is its round trip less its own forward pass: a forward right after an idle
  gap runs slower than in a tight loop (cold caches), and that is the model's time, not gRPC's.
- `in_process_us`: each step of the handler alone, in a tight loop: the request parsed, the tensor
  decoded and checked, the pixels validated and scaled, the reply built and serialized, the request
  recorded (telemetry window and metrics), next to the forward pass itself; then, on the same variant
  with a hollow forward pass (it only allocates the logits, so the forward's noise hides nothing),
  a prediction in place, through the micro-batcher (`edge.batching`) as a lone request meets it (run
  in place) and as one close behind another does (queued for its worker; a batch bound of 1, so it
  never waits for company), and handed to another thread and waited for (a one-thread pool).
- `servers_us`: the gRPC server's own cost, without the edge: a bytes echo of the request's size on a
  sync server (1, 2 and 16 worker threads; the agent runs 16) and on a `grpc.aio` server, against the
  same function called directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np

from bench.suites.switching_parts import Served, percentiles, servicer
from common.wire import GRPC_OPTIONS, SERVER_OPTIONS
from edge.batching import BatchConfig, MicroBatcher
from edge.runtime import Runtime, RuntimeConfig
from edge.variants import LoadedVariant
from protos import inference_pb2

ECHO = "/bench.Echo/Echo"


def timed(variant: LoadedVariant, log: list) -> LoadedVariant:
    """`variant` whose every forward pass appends its (start, end) to `log`."""
    inner = variant.forward

    def forward(x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = inner(x)
        log.append((start, time.perf_counter()))
        return out

    return dataclasses.replace(variant, forward=forward)


class Stamps(grpc.ServerInterceptor):
    """Per Predict: when gRPC's serving thread handed it over, and when a worker thread started and ended
    its handler (the request already parsed)."""

    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []

    def intercept_service(self, continuation, handler_call_details):
        arrived = time.perf_counter()
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/Predict"):
            return handler
        behavior = handler.unary_unary

        def stamped(request, context):
            started = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                self.rows.append((arrived, started, time.perf_counter()))

        return grpc.unary_unary_rpc_method_handler(stamped, handler.request_deserializer, handler.response_serializer)


def per_request(runtime: Runtime, request, requests: int) -> dict:
    """Sequential Predicts, each split into its steps (ms, p50 over requests; see the module docstring)."""
    forwards, stamps = [], Stamps()
    active = runtime.active
    runtime.add(timed(active, forwards))
    runtime.switch(active.variant_id, "bench")
    rows = []
    with Served(runtime, interceptors=(stamps,)) as served:
        for i in range(requests + requests // 10):
            forwards.clear()
            stamps.rows.clear()
            sent = time.perf_counter()
            served.stub.Predict(request, timeout=30)
            received = time.perf_counter()
            if i < requests // 10:
                continue  # warm-up
            (arrived, started, ended), (f0, f1) = stamps.rows[0], forwards[0]
            rows.append((arrived - sent, started - arrived, f0 - started, f1 - f0, ended - f1, received - ended))
    runtime.add(active)
    runtime.switch(active.variant_id, "bench")
    ms = np.asarray(rows) * 1e3
    names = (
        "client_to_arrival",
        "arrival_to_handler",
        "before_forward",
        "forward",
        "after_forward",
        "handler_to_client",
    )
    steps = {name: percentiles(list(ms[:, i])) for i, name in enumerate(names)}
    return {
        "steps_ms": steps,
        "round_trip_ms": percentiles(list(ms.sum(axis=1))),
        "overhead_ms": percentiles(list(ms.sum(axis=1) - ms[:, 3])),
    }


def _p50_us(call: Callable[[], object], n: int) -> float:
    for _ in range(max(1, n // 10)):
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    return float(np.percentile(samples, 50))


def _hollow(variant: LoadedVariant) -> Runtime:
    """A runtime holding `variant` with a forward pass that only allocates its logits: what is left of a
    prediction is the serving path's own work, which the forward pass's noise would otherwise hide."""
    classes = variant.spec.num_classes
    runtime = Runtime(RuntimeConfig())
    runtime.add(dataclasses.replace(variant, forward=lambda x: np.zeros((len(x), classes), np.float32)))
    runtime.switch(variant.variant_id, "bench")
    return runtime


def in_process(edge_servicer, runtime: Runtime, request, n: int) -> dict:
    """Each step of the handler alone, p50 us (see the module docstring)."""
    raw = request.SerializeToString()
    pixels = edge_servicer.decode(request.input)
    x, variant = runtime.validate(pixels)
    logits, variant_id = runtime.predict(pixels)
    reply = edge_servicer.reply(logits, variant_id)
    hollow = _hollow(variant)
    config = BatchConfig(max_delay_ms=1.0, max_batch=1)
    lone = MicroBatcher(hollow, config, clock=itertools.count(step=1.0).__next__)  # a second between requests
    queued = MicroBatcher(hollow, config)  # back to back: closer than the delay, so queued for a worker
    pool = futures.ThreadPoolExecutor(1)
    try:
        steps = {
            "parse_request": _p50_us(lambda: inference_pb2.PredictRequest.FromString(raw), n),
            "decode": _p50_us(lambda: edge_servicer.decode(request.input), n),
            "validate": _p50_us(lambda: runtime.validate(pixels), n),
            "forward": _p50_us(lambda: runtime.run(variant, x), n),
            "reply": _p50_us(lambda: edge_servicer.reply(logits, variant_id), n),
            "serialize_reply": _p50_us(reply.SerializeToString, n),
            "record": _p50_us(lambda: edge_servicer.finish(time.perf_counter(), variant_id), n),
            "predict": _p50_us(lambda: runtime.predict(pixels), n),
            "hollow_predict": _p50_us(lambda: hollow.predict(pixels), n),
            "hollow_batcher_lone": _p50_us(lambda: lone.predict(pixels), n),
            "hollow_batcher_queued": _p50_us(lambda: queued.predict(pixels), n),
            "hollow_predict_on_another_thread": _p50_us(lambda: pool.submit(hollow.predict, pixels).result(), n),
        }
    finally:
        lone.close()
        queued.close()
        pool.shutdown()
    steps["batcher_lone_cost"] = steps["hollow_batcher_lone"] - steps["hollow_predict"]
    steps["batcher_queued_cost"] = steps["hollow_batcher_queued"] - steps["hollow_predict"]
    steps["thread_handoff"] = steps["hollow_predict_on_another_thread"] - steps["hollow_predict"]
    return steps


def _echo(request: bytes, context) -> bytes:
    return request


async def _aecho(request: bytes, context) -> bytes:
    return request


def _handlers():
    return (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),)


def _sync_echo(payload: bytes, workers: int, n: int) -> float:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), handlers=_handlers(), options=SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            call = channel.unary_unary(ECHO)
            return _p50_us(lambda: call(payload, timeout=30), n)
    finally:
        server.stop(0).wait()


def _aio_echo(payload: bytes, n: int) -> float:
    loop, ready, box = asyncio.new_event_loop(), threading.Event(), {}

    async def start():
        aio = {"Echo": grpc.unary_unary_rpc_method_handler(_aecho)}
        server = grpc.aio.server(
            handlers=(grpc.method_handlers_generic_handler("bench.Echo", aio),), options=SERVER_OPTIONS
        )
        box["port"], box["server"] = server.add_insecure_port("127.0.0.1:0"), server
        await server.start()
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{box['port']}", options=GRPC_OPTIONS) as channel:
            call = channel.unary_unary(ECHO)
            return _p50_us(lambda: call(payload, timeout=30), n)
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def servers(payload: bytes, n: int) -> dict:
    """A bytes echo round trip per server kind, p50 us, and the function called directly."""
    return {
        "direct_call": _p50_us(lambda: _echo(payload, None), n),
        "sync_1_worker": _sync_echo(payload, 1, n),
        "sync_2_workers": _sync_echo(payload, 2, n),
        "sync_16_workers": _sync_echo(payload, 16, n),
        "aio": _aio_echo(payload, n),
    }


def study(runtime: Runtime, request, requests: int) -> dict:
    """The three views (module docstring) on `runtime`, whose active variant is the one measured."""
    return {
        "per_request": per_request(runtime, request, requests),
        "in_process_us": in_process(servicer(runtime), runtime, request, requests),
        "servers_us": servers(request.SerializeToString(), requests),
    }
