"""The cloud and an edge agent as real processes on loopback, speaking mutual TLS with the edge on a
certificate of its own: fetch, serve, switch under policy, operated with the operator's certificate."""

import time

import grpc
import numpy as np
import pytest
import torch
from helpers import wait_for

from cloud.admin import certs, operator_client
from cloud.build.store import PortfolioStore
from cloud.localfleet import commands, processes
from common import datasets, security, variant
from common.identity import Identity
from common.security import Transport
from common.wire import from_proto, to_proto
from protos import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The fleet's certificates, and edge-1's own (`certs issue edge edge-1`)."""
    written = certs.init(tmp_path_factory.mktemp("certs"))
    return {**written, "edge-1": certs.issue_holder(written["cloud"].parent, "edge", "edge-1")}


@pytest.fixture(scope="module")
def operator(keys):
    return Transport.load(keys["operator"], token=True)


@pytest.fixture(scope="module")
def client(keys):
    return Transport.load(keys["client"])


@pytest.fixture(scope="module")
def cluster(small_portfolio, tmp_path_factory, keys):
    run = tmp_path_factory.mktemp("cluster")
    db = run / "fleet.sqlite"
    cloud = processes.Launch("cloud", commands.cloud_args(small_portfolio, db=db, certs=keys["cloud"]))

    def edge(address: str) -> list[processes.Launch]:  # its own certificate, batches of 8 on one thread
        args = commands.edge_args(address, "edge-1", cache=run / "cache", certs=keys["edge-1"], threads=1, batch=8)
        return [processes.Launch("edge", args)]

    children = processes.start_cluster(cloud, edge, run / "logs")
    try:
        yield children[0], children[1], PortfolioStore(small_portfolio)
    finally:
        processes.stop_all(children)


def _wait_for(predicate, timeout_s=60.0, what="condition"):
    return wait_for(predicate, timeout_s, what, interval_s=0.3)


def _edge_status(cloud, operator):
    fleet = operator_client.fleet(operator_client.coordinator_stub(cloud.address, operator))
    return next((e for e in fleet.edges if e.edge == "edge-1"), None)


def _inference(edge, client):
    return inference_pb2_grpc.InferenceServiceStub(client.channel(edge.address))


def _predict(edge, images, client):
    return _inference(edge, client).Predict(inference_pb2.PredictRequest(input=to_proto(images)), timeout=10)


def test_edge_fetches_profiles_and_serves_real_predictions(cluster, fashion_mnist, operator, client):
    cloud, edge, store = cluster
    manifest = store.manifest()
    status = _wait_for(
        lambda: (s := _edge_status(cloud, operator)) and len(s.profiles) == len(manifest.variants) and s,
        what="profiles of every variant",
    )
    assert {p.variant_id for p in status.profiles} == {v.variant_id for v in manifest.variants}
    images = fashion_mnist.test.images[:256].numpy()
    reply = _predict(edge, images, client)
    logits = from_proto(reply.output)
    assert logits.shape == (256, 10) and reply.variant_id in {v.variant_id for v in manifest.variants}
    # the edge answers exactly what the cloud's variant file computes on normalized pixels
    served = variant.load(store.variant_path(reply.variant_id))
    x = datasets.normalize(fashion_mnist.test.images[:256], served.spec.mean, served.spec.std)
    with torch.no_grad():
        expected = served.model(x).numpy()
    assert np.abs(logits - expected).max() < 1e-4
    accuracy = float((logits.argmax(1) == fashion_mnist.test.labels[:256].numpy()).mean())
    assert accuracy > 0.3  # a trained model answered (chance is 0.1)


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((2, 3, 28, 28), np.float32), "[N, 1, 28, 28]"),
        (np.zeros((2, 28, 28), np.uint8), "[N, 1, 28, 28]"),
    ],
)
def test_bad_shapes_get_invalid_argument_naming_the_expected_shape(cluster, client, array, needle):
    _, edge, _ = cluster
    with pytest.raises(grpc.RpcError) as err:
        _predict(edge, array, client)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_bad_dtype_and_byte_count_get_invalid_argument(cluster, client):
    _, edge, _ = cluster
    stub = _inference(edge, client)
    for tensor in (
        inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="float64", data=bytes(8 * 784)),
        inference_pb2.Tensor(shape=[1, 1, 28, 28], dtype="float32", data=bytes(10)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(inference_pb2.PredictRequest(input=tensor), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details()


def test_the_edge_presents_its_own_certificate_and_takes_predicts_from_clients_only(cluster, keys, fashion_mnist):
    """Its certificate names edge-1 (a client checks that in the handshake); a plaintext caller is refused
    in the handshake, and a holder of another role's certificate than client or operator is refused."""
    _, edge, _ = cluster
    assert security.Transport.load(keys["edge-1"]).identity == Identity("edge", "edge-1")
    images = fashion_mnist.test.images[:8].numpy()
    for caller, code in (
        (Transport.plaintext(), grpc.StatusCode.UNAVAILABLE),
        (Transport.load(keys["edge"]).for_edges(), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            _predict(edge, images, caller)
        assert err.value.code() == code


def _events(cloud, code, operator):
    events = operator_client.events(operator_client.coordinator_stub(cloud.address, operator), "edge-1")
    return [e.event for e in events if e.event.reason_code == code]


def test_policy_drives_a_switch_down_and_back_up(cluster, fashion_mnist, operator, client):
    """Start from a variant that is not the fastest by the edge's own profile (tiny variants of equal
    shape profile within noise of each other, so which one is fastest is read, not assumed); an SLO
    nothing meets sends the edge to the fastest, a loose one brings it back to the most accurate."""
    cloud, edge, store = cluster
    manifest = store.manifest()
    status = _wait_for(
        lambda: (s := _edge_status(cloud, operator)) and len(s.profiles) == len(manifest.variants) and s,
        what="profiles",
    )
    accuracy = {v.variant_id: v.accuracy for v in manifest.variants}
    # the policy's order when nothing meets the SLO: p50, then p95, then the more accurate, then the id
    latency = {
        p.variant_id: (p.p50_ms_batch, p.p95_ms_batch, -accuracy[p.variant_id], p.variant_id) for p in status.profiles
    }
    fastest, best = min(latency, key=latency.get), max(accuracy, key=accuracy.get)
    start = best if best != fastest else max((v for v in accuracy if v != fastest), key=accuracy.get)
    images = fashion_mnist.test.images[:8].numpy()
    operator_client.set_policy(
        cloud.address,
        operator,
        slo_ms=10_000.0,
        pinned_variant=start,
        down_windows=1,
        up_windows=1,
        dwell_s=0.0,
        window_s=0.5,
    )

    def loaded_until(predicate, what):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if predicate(_predict(edge, images, client)):
                return
        raise AssertionError(f"timed out waiting for {what}")

    loaded_until(lambda reply: reply.variant_id == start, "the pin")
    operator_client.set_policy(cloud.address, operator, slo_ms=0.001, pinned_variant="")
    loaded_until(lambda _: _events(cloud, "slo_violation", operator), "a switch down")
    down = _events(cloud, "slo_violation", operator)[-1]
    assert down.from_variant == start and down.to_variant == fastest and "SLO" in down.reason
    assert latency[down.to_variant] < latency[down.from_variant]
    assert _predict(edge, images, client).variant_id == fastest
    if best == fastest:  # the fastest is also the most accurate: there is nothing to step up to
        return
    operator_client.set_policy(cloud.address, operator, slo_ms=10_000.0)
    loaded_until(lambda _: _events(cloud, "headroom", operator), "a switch back up")
    up = _events(cloud, "headroom", operator)[-1]
    assert up.from_variant == fastest and accuracy[up.to_variant] > accuracy[up.from_variant]


def test_operator_cli_shows_the_fleet_and_sets_the_policy(cluster, keys, operator):
    import subprocess
    import sys
    from pathlib import Path

    cloud, _, _ = cluster
    cli = str(Path(sys.executable).parent / "prunefleet")
    _wait_for(lambda: (s := _edge_status(cloud, operator)) and s.telemetry.active_variant, what="first telemetry")
    flags = ["--certs", str(keys["operator"])]  # the operator's certificate and, from beside it, the token
    status = subprocess.run(
        [cli, "fleet", "status", "--cloud", cloud.address, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "edge-1" in status and "live" in status and "vgg11-L" in status
    changed = subprocess.run(
        [cli, "policy", "set", "--cloud", cloud.address, "--slo-ms", "123", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "123.0 ms" in changed
    events = subprocess.run(
        [cli, "fleet", "events", "--cloud", cloud.address, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "edge-1" in events and "initial" in events
    bad = subprocess.run(
        [cli, "policy", "set", "--cloud", cloud.address, "--slo-ms", "-5", *flags],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "slo_ms" in bad.stderr
