"""One portfolio, two edge backends: a cloud serving a portfolio with int8 members, a torch edge and an
ONNX Runtime edge in a process where importing torch fails, all real processes on loopback. Each holds
the members its backend serves (the torch edge leaves the int8 members out and says so) and reports the
same portfolio id; both switch under the fleet's policy, and both answer as the cloud's torch variant
does (max abs diff of logits at most 1e-4, same argmax) on real Fashion-MNIST test images."""

import urllib.request

import grpc
import numpy as np
import pytest
from helpers import wait_for
from test_ort_edge import NO_TORCH, active, build_int8_portfolio, edge_status, environment, torch_logits

from cloud.admin import operator_client
from cloud.build.store import INT8, PortfolioStore
from cloud.localfleet import commands, processes
from common.files import portfolio_id
from common.security import Transport
from common.wire import from_proto, to_proto
from protos import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration
PLAIN = Transport.plaintext()
EDGES = ("edge-torch", "edge-ort")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run = tmp_path_factory.mktemp("two-backends")
    store = PortfolioStore(build_int8_portfolio(run / "p"))
    cloud = processes.start("cloud", commands.cloud_args(store.root, db=run / "fleet.sqlite", certs=None), run / "logs")
    children = [cloud]
    try:
        for name, env, backend in (("edge-torch", {}, "torch"), ("edge-ort", environment(run / "sc", NO_TORCH), "")):
            extra = ("--backend", backend) if backend else ()  # the ORT edge picks ONNX Runtime by itself
            args = commands.edge_args(
                cloud.address, name, cache=run / name, certs=None, threads=1, batch=4, extra=extra
            )
            children.append(processes.start(name, args, run / "logs", env=env))
        yield cloud, dict(zip(EDGES, children[1:])), store, run
    finally:
        processes.stop_all(children)


def _left_out(edge, name: str, backend: str) -> float:
    text = urllib.request.urlopen(f"http://{edge.metrics_address}/metrics", timeout=10).read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f'prunefleet_edge_members_left_out{{backend="{backend}"'))
    assert f'edge="{name}"' in line
    return float(line.split(" ")[-1])


def test_a_torch_edge_and_an_onnx_edge_switch_together_and_agree_with_the_cloud(cluster, fashion_mnist):
    cloud, edges, store, run = cluster
    members = store.manifest().variants
    floats, int8 = [e for e in members if e.precision != INT8], [e for e in members if e.precision == INT8]
    assert floats and int8
    for name in EDGES:
        wait_for(lambda: active(cloud, name), timeout_s=120, what=f"{name}'s first telemetry", interval_s=0.3)  # noqa: B023
        status = wait_for(
            lambda: (s := edge_status(cloud, name)) and s.reported_portfolio_id == s.desired_portfolio_id and s,  # noqa: B023
            timeout_s=60,
            what=f"{name} reporting the portfolio it holds",
        )
        assert status.reported_portfolio_id == portfolio_id(e.variant_id for e in members)
    held = {name: {p.variant_id for p in edge_status(cloud, name).profiles} for name in EDGES}
    assert held["edge-torch"] == {e.variant_id for e in floats} and held["edge-ort"] == {e.variant_id for e in members}
    assert _left_out(edges["edge-torch"], "edge-torch", "torch") == len(int8)
    assert _left_out(edges["edge-ort"], "edge-ort", "onnxruntime") == 0
    for name, suffix in (("edge-torch", ".safetensors"), ("edge-ort", ".onnx")):  # each fetched only its files
        assert {p.suffix for p in (run / name).iterdir() if not p.name.startswith(".")} == {suffix}
    assert "serving with the onnxruntime backend" in edges["edge-ort"].log_path.read_text()

    images = fashion_mnist.test.images[:64].numpy()
    stubs = {n: inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edges[n].address)) for n in EDGES}
    for entry in [*reversed(floats), *floats]:  # the policy's pin moves both edges, each way
        operator_client.set_policy(cloud.address, PLAIN, pinned_variant=entry.variant_id)
        want = torch_logits(store, entry.variant_id, images)
        for name in EDGES:
            wait_for(lambda: active(cloud, name) == entry.variant_id, timeout_s=60, what=f"{name} pinned")  # noqa: B023
            reply = stubs[name].Predict(inference_pb2.PredictRequest(input=to_proto(images)), timeout=30)
            got = from_proto(reply.output)
            assert reply.variant_id == entry.variant_id
            assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all(), (name, entry.name)
    before = active(cloud, "edge-torch")
    operator_client.set_policy(cloud.address, PLAIN, pinned_variant=int8[0].variant_id)  # only the ORT edge serves it
    wait_for(lambda: active(cloud, "edge-ort") == int8[0].variant_id, timeout_s=60, what="the ORT edge on int8")
    assert active(cloud, "edge-torch") == before
    operator_client.set_policy(cloud.address, PLAIN, pinned_variant="")

    stub = operator_client.coordinator_stub(cloud.address, PLAIN)
    for name in EDGES:
        switches = [e.event for e in operator_client.events(stub, name) if e.event.switched]
        assert sum(e.reason_code == "pinned" for e in switches) >= len(floats)
