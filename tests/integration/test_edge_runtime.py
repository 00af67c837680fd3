"""An edge under a memory budget with micro-batching and optimized models, as a real process beside a
real cloud: the operator pins and unpins while a client keeps asking and another sends bad input;
nobody good fails, evicted variants load on demand with the cost recorded, and every decision is
queryable."""

import threading
import urllib.request

import grpc
import numpy as np
import pytest
from helpers import wait_for

from cloud.admin import operator_client
from cloud.build.store import PortfolioStore
from cloud.localfleet import commands, processes
from common.security import Transport
from common.wire import MAX_MESSAGE_BYTES, to_proto
from protos import inference_pb2, inference_pb2_grpc

PLAIN = Transport.plaintext()  # these processes run plaintext (--insecure)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(small_portfolio, tmp_path_factory):
    run = tmp_path_factory.mktemp("edge-runtime")
    store = PortfolioStore(small_portfolio)
    budget_mib = 1.2 * max(v.size_bytes for v in store.manifest().variants) / (1 << 20)  # one variant at a time
    flags = ("--memory-budget-mib", f"{budget_mib:.4f}", "--batch-delay-ms", "2", "--optimize-models")
    children = processes.start_cluster(
        processes.Launch("cloud", commands.cloud_args(small_portfolio, db=run / "fleet.sqlite", certs=None)),
        lambda cloud: [
            processes.Launch(
                "edge",
                commands.edge_args(cloud, "edge-m", cache=run / "cache", certs=None, threads=1, batch=4, extra=flags),
            )
        ],
        run / "logs",
    )
    try:
        yield children[0], children[1], store, budget_mib
    finally:
        processes.stop_all(children)


def _active(cloud):
    fleet = operator_client.fleet(operator_client.coordinator_stub(cloud.address, PLAIN))
    edge = next((e for e in fleet.edges if e.edge == "edge-m"), None)
    return edge.telemetry.active_variant if edge else ""


def _events(cloud):
    return [e.event for e in operator_client.events(operator_client.coordinator_stub(cloud.address, PLAIN), "edge-m")]


BAD = [
    (
        inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="float32", data=np.full(784, np.nan, np.float32).tobytes()),
        "INVALID_ARGUMENT",
        "NaN",
    ),
    (to_proto(np.zeros((1, 3, 28, 28), np.uint8)), "INVALID_ARGUMENT", "[N, 1, 28, 28]"),
    (inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="int64", data=bytes(784 * 8)), "INVALID_ARGUMENT", "int64"),
    (inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="uint8", data=bytes(700)), "INVALID_ARGUMENT", "700 bytes"),
    (inference_pb2.Tensor(shape=[50_000, 1, 28, 28], dtype="float32"), "RESOURCE_EXHAUSTED", "limit"),
    (
        inference_pb2.Tensor(shape=[3000, 1, 28, 28], dtype="float32", data=bytes(MAX_MESSAGE_BYTES + 1024)),
        "RESOURCE_EXHAUSTED",
        "larger than max",
    ),
]


def test_pins_under_load_with_bad_input_fail_no_good_request(cluster):
    cloud, edge, store, budget_mib = cluster
    ids = [v.variant_id for v in store.manifest().variants]
    wait_for(lambda: _active(cloud), timeout_s=120, what="the edge's first telemetry", interval_s=0.3)
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge.address))
    good = inference_pb2.PredictRequest(input=to_proto(np.zeros((2, 1, 28, 28), np.uint8)))
    stop, failures, answered, bad_codes = threading.Event(), [], set(), []

    def client():
        while not stop.is_set():
            try:
                answered.add(stub.Predict(good, timeout=30).variant_id)
            except grpc.RpcError as err:
                failures.append(err.code())

    def bad_client():
        while not stop.is_set():
            for tensor, _code, needle in BAD:
                try:
                    stub.Predict(inference_pb2.PredictRequest(input=tensor), timeout=30)
                    bad_codes.append(("answered", needle))
                except grpc.RpcError as err:
                    bad_codes.append((err.code().name, needle) if needle in err.details() else (err.details(), needle))

    threads = [threading.Thread(target=client) for _ in range(2)] + [threading.Thread(target=bad_client)]
    for thread in threads:
        thread.start()
    try:
        for variant_id in [*ids, ids[0]]:
            operator_client.set_policy(cloud.address, PLAIN, pinned_variant=variant_id)
            wait_for(lambda: _active(cloud) == variant_id, timeout_s=60, what="the pin", interval_s=0.2)  # noqa: B023 - called before the loop moves on
        operator_client.set_policy(cloud.address, PLAIN, pinned_variant="")
        wait_for(lambda: any(e.reason_code == "unpinned" for e in _events(cloud)), timeout_s=30, what="the unpin")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == [] and set(ids) <= answered
    assert bad_codes and set(bad_codes) == {(code, needle) for _, code, needle in BAD}

    events = _events(cloud)
    pins = [e for e in events if e.reason_code == "pinned" and e.switched]
    assert any(e.load_ms > 0 for e in pins)  # a variant evicted under the budget was loaded on demand
    assert all(e.policy_version > 0 and e.slo_ms > 0 for e in events)
    unpin = next(e for e in events if e.reason_code == "unpinned")
    assert not unpin.switched and unpin.from_variant == unpin.to_variant
    table = operator_client.events_table(cloud.address, PLAIN, "edge-m")
    assert "unpinned" in table and "load ms" in table

    text = urllib.request.urlopen(f"http://{edge.metrics_address}/metrics", timeout=10).read().decode()
    metric = {
        line.split(" ")[0]: float(line.split(" ")[-1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metric['prunefleet_edge_variant_loads_total{edge="edge-m",source="on_demand"}'] > 0
    assert metric['prunefleet_edge_evictions_total{edge="edge-m"}'] > 0
    assert metric['prunefleet_edge_batch_size_count{edge="edge-m"}'] > 0
    assert metric['prunefleet_edge_resident_bytes{edge="edge-m"}'] <= budget_mib * (1 << 20)
    assert metric['prunefleet_edge_resident_variants{edge="edge-m"}'] < len(ids)
    assert metric['prunefleet_edge_requests_total{code="RESOURCE_EXHAUSTED",edge="edge-m",variant="none"}'] > 0
