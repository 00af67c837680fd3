"""The ONNX Runtime edge for real: a portfolio built with int8 members, a cloud that lists every member
with both of its files and serves each by its id, and edge agents as processes speaking gRPC on
loopback. One runs where importing torch fails (and picks ONNX Runtime by itself); one runs
`--backend onnxruntime` where torch is installed and never imports it. They fetch the ONNX files, serve
Predict with the answers of the cloud's torch variants, switch under the policy (int8 members
included, loaded on demand under a memory budget) and report telemetry to the cloud."""

import os
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import wait_for

from cloud.admin import operator_client
from cloud.build import portfolio
from cloud.build.methods import shifter
from cloud.build.store import INT8, PortfolioStore
from cloud.build.train import TrainConfig
from cloud.localfleet import commands, processes
from cloud.service.catalog import Catalog
from cloud.service.fleet_db import FleetDB
from common import variant
from common.files import portfolio_id
from common.security import Signer, Transport, Verifier
from common.wire import from_proto, to_proto
from edge import ort_model
from edge.backends import ort
from protos import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration
PLAIN = Transport.plaintext()
NO_TORCH = 'import sys\nsys.modules["torch"] = None  # no torch in this environment: importing it fails\n'
RECORD_MODULES = (
    "import atexit, os, sys\n"
    "atexit.register(lambda: open(os.environ['RECORD_MODULES_TO'], 'w').write('\\n'.join(sorted(sys.modules))))\n"
)


def build_int8_portfolio(out: Path) -> Path:
    """vgg11 at width 1/8 on 800 training images, level 0 and one level pruned by half, with int8 members."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        portfolio.build(
            portfolio.BuildConfig(
                out=out,
                model="vgg11",
                width=0.125,
                subset=800,
                threads=1,
                check_images=32,
                calibration_images=128,
                train=TrainConfig(epochs=1, batch_size=32, lr=0.02, progress=False),
                int8=True,
                method_settings=shifter.ShifterConfig(levels=1, rate=0.5),
            )  # fmt: skip
        )
    finally:
        torch.set_num_threads(threads)
    return out


def environment(directory: Path, sitecustomize: str) -> dict[str, str]:
    """The environment of a child whose interpreter runs `sitecustomize` first."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(sitecustomize)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)}


def torch_logits(store: PortfolioStore, variant_id: str, images: np.ndarray) -> np.ndarray:
    """The cloud's torch variant on uint8 images, normalized as every edge normalizes them."""
    held = variant.load(store.variant_path(variant_id), expected_sha256=variant_id)
    mean = torch.tensor(held.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(held.spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return held.model.eval()((torch.from_numpy(images).float() / 255 - mean) / std).numpy()


def edge_status(cloud, name: str):
    fleet = operator_client.fleet(operator_client.coordinator_stub(cloud.address, PLAIN))
    return next((e for e in fleet.edges if e.edge == name), None)


def active(cloud, name: str) -> str:
    status = edge_status(cloud, name)
    return status.telemetry.active_variant if status else ""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PortfolioStore:
    return PortfolioStore(build_int8_portfolio(tmp_path_factory.mktemp("ort-edge") / "p"))


@pytest.fixture(scope="module")
def cluster(store, tmp_path_factory):
    """A cloud, an edge where torch cannot be imported (no --backend: it picks onnxruntime) under a memory
    budget of about one ONNX file, and an edge told `--backend onnxruntime` where torch is installed,
    which records the modules it imported when it exits."""
    run = tmp_path_factory.mktemp("ort-cluster")
    largest = max(e.onnx_bytes for e in store.manifest().variants)
    budget = ("--memory-budget-mib", f"{1.2 * ort.held_bytes(largest) / (1 << 20):.4f}")  # about one member
    cloud = processes.start("cloud", commands.cloud_args(store.root, db=run / "fleet.sqlite", certs=None), run / "logs")
    children = [cloud]
    try:
        for name, env, extra in (
            ("ort-free", environment(run / "no-torch", NO_TORCH), budget),
            ("ort-rec", environment(run / "record", RECORD_MODULES), ("--backend", "onnxruntime")),
        ):
            args = commands.edge_args(
                cloud.address, name, cache=run / name, certs=None, threads=1, batch=4, extra=extra
            )
            env["RECORD_MODULES_TO"] = str(run / "modules.txt")
            children.append(processes.start(name, args, run / "logs", env=env))
        yield cloud, children[1], children[2], run
    finally:
        processes.stop_all(children)


def test_the_cloud_lists_every_member_with_both_files_signed(store, tmp_path):
    key = Ed25519PrivateKey.generate()
    catalog = Catalog(FleetDB(tmp_path / "fleet.sqlite", clock=time.time), Signer(key))
    manifest = catalog.add(store.root)
    listing, verifier = catalog.listing(manifest.portfolio_id), Verifier(key.public_key())
    entries = {e.variant_id: e for e in store.manifest().variants}
    assert {v.variant_id for v in listing.variants} == set(entries) and any(
        e.precision == INT8 for e in entries.values()
    )
    assert listing.portfolio_id == manifest.portfolio_id == portfolio_id(entries)  # every member, int8 included
    for info in listing.variants:
        entry = entries[info.variant_id]
        assert (info.precision, info.parent_id, info.onnx_id) == (entry.precision, entry.parent or "", entry.onnx_id)
        assert info.onnx_size_bytes == entry.onnx_bytes == store.onnx_path(entry.onnx_id).stat().st_size
        verifier.check(info.variant_id, info.signature)
        verifier.check(info.onnx_id, info.onnx_signature)
        assert catalog.artifact(info.onnx_id) == (store.onnx_path(entry.onnx_id), entry.onnx_bytes)
        assert catalog.artifact(info.variant_id) == (store.member_path(entry), entry.size_bytes)
        if entry.precision == INT8:  # its own file is its ONNX file: no safetensors file
            assert info.variant_id == info.onnx_id and info.size_bytes == info.onnx_size_bytes
            assert info.parent_id in entries and entries[info.parent_id].precision == "float32"
        else:  # an ONNX file is no member: pins and the like name members
            assert catalog.file(info.onnx_id) is None and catalog.file(info.variant_id)[0] == entry


def test_an_edge_without_torch_serves_switches_and_reports(cluster, store, fashion_mnist):
    cloud, edge, _, _ = cluster
    members = store.manifest().variants
    wait_for(lambda: active(cloud, "ort-free"), timeout_s=120, what="the edge's first telemetry", interval_s=0.3)
    status = wait_for(
        lambda: (s := edge_status(cloud, "ort-free")) and s.reported_portfolio_id == s.desired_portfolio_id and s,
        timeout_s=60,
        what="the edge reporting the portfolio it holds",
    )
    assert status.reported_portfolio_id == portfolio_id(e.variant_id for e in members)
    assert {p.variant_id for p in status.profiles} == {e.variant_id for e in members}  # int8 members included
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge.address))
    images = fashion_mnist.test.images[:64].numpy()
    stop, failures = threading.Event(), []

    def client():
        while not stop.is_set():
            try:
                stub.Predict(inference_pb2.PredictRequest(input=to_proto(images[:2])), timeout=30)
            except grpc.RpcError as err:
                failures.append(err.code())

    load = threading.Thread(target=client)
    load.start()
    answers = {}
    try:
        for entry in [*members, members[0]]:  # every member, then back: some load on demand
            operator_client.pin(cloud.address, PLAIN, "ort-free", entry.variant_id)
            wait_for(lambda: active(cloud, "ort-free") == entry.variant_id, timeout_s=60, what="the pin")  # noqa: B023
            reply = stub.Predict(inference_pb2.PredictRequest(input=to_proto(images)), timeout=30)
            answers[reply.variant_id] = from_proto(reply.output)
        operator_client.pin(cloud.address, PLAIN, "ort-free", "")
    finally:
        stop.set()
        load.join()
    assert failures == [] and set(answers) == {e.variant_id for e in members}
    for entry in members:
        got = answers[entry.variant_id]
        if entry.precision == INT8:  # the cloud's int8 member: its own file, run here
            want = ort_model.open_file(store.member_path(entry), expected_sha256=entry.variant_id).run(images)
        else:
            want = torch_logits(store, entry.variant_id, images)
        assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all(), entry.name

    events = [
        e.event for e in operator_client.events(operator_client.coordinator_stub(cloud.address, PLAIN), "ort-free")
    ]
    assert sum(e.reason_code == "pinned" and e.switched for e in events) >= len(members)
    text = urllib.request.urlopen(f"http://{edge.metrics_address}/metrics", timeout=10).read().decode()
    assert 'prunefleet_edge_variant_loads_total{edge="ort-free",source="on_demand"}' in text
    resident = next(x for x in text.splitlines() if x.startswith('prunefleet_edge_resident_bytes{edge="ort-free"}'))
    assert 0 < float(resident.split(" ")[-1]) <= 1.2 * ort.held_bytes(max(e.onnx_bytes for e in members))
    assert 'prunefleet_edge_members_left_out{backend="onnxruntime",edge="ort-free"} 0.0' in text
    assert "serving with the onnxruntime backend" in edge.log_path.read_text()  # chosen: torch does not import


def test_an_onnx_agent_never_imports_torch_where_torch_is_installed(cluster):
    cloud, _, recorder, run = cluster
    wait_for(lambda: active(cloud, "ort-rec"), timeout_s=120, what="the recording edge's telemetry", interval_s=0.3)
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(recorder.address))
    reply = stub.Predict(inference_pb2.PredictRequest(input=to_proto(np.zeros((1, 1, 28, 28), np.uint8))), timeout=30)
    assert reply.variant_id
    assert recorder.stop() == 0
    modules = (run / "modules.txt").read_text().split()
    assert "onnxruntime" in modules and "edge.backends.ort" in modules  # it did serve with ONNX Runtime
    assert not [m for m in modules if m.split(".")[0] in ("torch", "torchvision", "safetensors")]
