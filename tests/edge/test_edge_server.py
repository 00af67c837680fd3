"""InferenceService on a real gRPC server on loopback: answers, status codes, health, reflection, metrics."""

import dataclasses
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from edge_helpers import load_variant, wait_for, write_variant
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from common.wire import from_proto, to_proto
from edge import server
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime, RuntimeConfig
from edge.server import INFERENCE_SERVICE, InferenceServicer, make_server, set_serving
from edge.telemetry import RequestWindow
from protos import inference_pb2, inference_pb2_grpc

EXPECTED = "expected shape [N, 1, 28, 28] with 1 <= N <= 64"


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    held = load_variant(*write_variant(tmp_path_factory.mktemp("variants")), name="small")
    runtime = Runtime(RuntimeConfig(slots=1, max_batch=64))
    registry, window = CollectorRegistry(), RequestWindow(time.monotonic())
    servicer = InferenceServicer(runtime, window, EdgeMetrics(registry, "edge-t", slo_s=0.033))
    server, port, health = make_server(servicer, "127.0.0.1", 0, workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield dict(
        runtime=runtime,
        held=held,
        health=health,
        registry=registry,
        window=window,
        channel=channel,
        stub=inference_pb2_grpc.InferenceServiceStub(channel),
    )
    channel.close()
    server.stop(0)


def _health(edge, service=""):
    stub = health_pb2_grpc.HealthStub(edge["channel"])
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _error(edge, tensor) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        edge["stub"].Predict(inference_pb2.PredictRequest(input=tensor), timeout=10)
    return err.value


def test_before_a_variant_is_active_not_serving_and_unavailable(edge):
    assert _health(edge) == _health(edge, INFERENCE_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    err = _error(edge, to_proto(np.zeros((1, 1, 28, 28), np.uint8)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details()


def test_describe_before_a_variant_is_active_is_unavailable(edge):
    with pytest.raises(grpc.RpcError) as err:
        edge["stub"].Describe(inference_pb2.DescribeRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no variant" in err.value.details()


@pytest.fixture
def serving(edge):
    edge["runtime"].add(edge["held"])
    edge["runtime"].switch(edge["held"].variant_id, "initial")
    set_serving(edge["health"], True)
    return edge


def test_health_reports_serving(serving):
    assert _health(serving) == _health(serving, INFERENCE_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_predict_answers_logits_and_the_variant(serving):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    reply = serving["stub"].Predict(inference_pb2.PredictRequest(input=to_proto(pixels)), timeout=10)
    logits = from_proto(reply.output)
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    assert reply.variant_id == serving["held"].variant_id
    np.testing.assert_allclose(logits, serving["runtime"].predict(pixels)[0], atol=1e-6)


@pytest.mark.parametrize(
    "tensor",
    [
        to_proto(np.zeros((2, 3, 28, 28), np.float32)),  # wrong channels
        to_proto(np.zeros((2, 28, 28), np.uint8)),  # no channel dimension
        to_proto(np.zeros((65, 1, 28, 28), np.uint8)),  # over max_batch
        inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="float64", data=bytes(8 * 784)),  # dtype
        inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="float32", data=bytes(10)),  # byte count
        inference_pb2.Tensor(shape=[1, -1, 28, 28], dtype="float32", data=b""),  # negative dimension
        inference_pb2.Tensor(),  # empty
    ],
    ids=["channels", "rank", "batch", "dtype", "bytes", "negative", "empty"],
)
def test_bad_tensors_get_invalid_argument_naming_the_expected_shape(serving, tensor):
    err = _error(serving, tensor)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and EXPECTED in err.details()


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_pixels_get_invalid_argument(serving, bad):
    pixels = np.full((1, 1, 28, 28), 0.5, np.float32)
    pixels[0, 0, 0, 0] = bad
    err = _error(serving, to_proto(pixels))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in err.details()


def test_payload_over_the_limit_gets_resource_exhausted(serving):
    declared = inference_pb2.Tensor(shape=[100_000, 1, 28, 28], dtype="float32", data=b"")
    err = _error(serving, declared)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in err.details()
    sent = inference_pb2.Tensor(shape=[3000, 1, 28, 28], dtype="float32", data=bytes(3000 * 784 * 4))
    assert _error(serving, sent).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused by the transport


def test_reflection_lists_the_services(serving):
    stub = reflection_pb2_grpc.ServerReflectionStub(serving["channel"])
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {INFERENCE_SERVICE, "grpc.health.v1.Health"} <= names


def test_requests_reach_metrics_and_the_telemetry_window(serving):
    serving["window"].close_window(time.monotonic())
    pixels = np.zeros((2, 1, 28, 28), np.uint8)
    for _ in range(3):
        serving["stub"].Predict(inference_pb2.PredictRequest(input=to_proto(pixels)), timeout=10)
    _error(serving, to_proto(np.zeros((2, 28, 28), np.uint8)))
    stats = serving["window"].close_window(time.monotonic())
    assert (stats.requests, stats.errors) == (4, 1) and stats.p95_ms > 0
    text = generate_latest(serving["registry"]).decode()
    short = serving["held"].variant_id[:12]
    assert f'prunefleet_edge_requests_total{{code="OK",edge="edge-t",variant="{short}"}}' in text
    assert 'prunefleet_edge_requests_total{code="INVALID_ARGUMENT",edge="edge-t",variant="none"}' in text
    assert f'prunefleet_edge_request_duration_seconds_bucket{{edge="edge-t",le="0.033",variant="{short}"}}' in text
    assert "process_resident_memory_bytes" in text


def test_requests_count_as_come_while_they_wait_for_a_worker_thread(serving):
    """Four worker threads, the device's one slot held: four Predicts wait for the slot, two more wait
    inside gRPC for a worker. All six have come, as the policy's request rate must see them."""
    runtime, window = serving["runtime"], serving["window"]
    before = window.arrived
    request = inference_pb2.PredictRequest(input=to_proto(np.zeros((1, 1, 28, 28), np.uint8)))
    calls = [
        threading.Thread(target=serving["stub"].Predict, args=(request,), kwargs={"timeout": 30}) for _ in range(6)
    ]
    runtime._slots.acquire()
    try:
        for call in calls:
            call.start()
        wait_for(lambda: window.arrived - before == 6 and runtime.in_flight == 4, what="six come, four at the slot")
        time.sleep(0.2)
        assert runtime.in_flight == 4  # the other two have no worker yet
    finally:
        runtime._slots.release()
        for call in calls:
            call.join(30)
    assert window.arrived - before == 6  # counted once each


def test_describe_answers_the_active_spec_and_is_no_request(serving):
    spec = serving["held"].spec
    before = serving["window"].arrived
    reply = serving["stub"].Describe(inference_pb2.DescribeRequest(), timeout=10)
    assert (reply.variant_id, reply.name) == (serving["held"].variant_id, "small")
    assert tuple(reply.input_shape) == spec.input_shape and reply.num_classes == spec.num_classes
    assert tuple(reply.mean) == spec.mean and tuple(reply.std) == spec.std
    assert tuple(reply.classes) == spec.classes and reply.max_batch == 64
    assert serving["window"].arrived == before  # not counted as a Predict arrival


def test_describe_sends_class_names_only_within_its_bound(edge, monkeypatch):
    held = edge["held"]
    names = tuple(f"class {i}" for i in range(held.spec.num_classes))
    named = dataclasses.replace(held, spec=dataclasses.replace(held.spec, classes=names))
    runtime = SimpleNamespace(active=named, config=RuntimeConfig(max_batch=8))
    assert tuple(server.describe(runtime).classes) == names
    monkeypatch.setattr(server, "MAX_CLASS_NAMES_BYTES", 50)
    reply = server.describe(runtime)
    assert list(reply.classes) == [] and reply.num_classes == len(names)  # the client falls back to indices
