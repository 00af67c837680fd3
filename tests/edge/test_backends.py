"""The edge's two backends against an in-process fake cloud: each offers its policy only the members it
serves (torch: variant files; onnxruntime: every member's ONNX file, int8 included) and fetches only
those files, says what it left out, checks the cloud's signature over each file it fetches, reports
the listing's portfolio id, answers as the torch variant does, and loads members on demand under a
memory budget."""

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edge_helpers import FakeCloud, wait_for, write_variant

from cloud.build import onnx_export, quantize
from common import datasets, variant
from common.files import portfolio_id, sha256_bytes
from common.security import Signer, Transport
from common.wire import from_proto, to_proto
from edge import backends
from edge.agent import initial_portfolio
from edge.backends.base import BackendSettings, offer
from edge.config import AgentConfig
from edge.loading import variant_info
from edge.node import assemble
from edge.runtime import Runtime, RuntimeConfig
from protos import inference_pb2, inference_pb2_grpc, portfolio_pb2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def listing(fashion_mnist, tmp_path_factory):
    """Two float32 variants with ONNX files, an int8 member of the first, and a float32 variant without
    an ONNX file, all signed by one key: (files by id, listing, the key, the variants as loaded)."""
    work, key = tmp_path_factory.mktemp("members"), Ed25519PrivateKey.generate()
    signer, files, infos, held = Signer(key), {}, [], {}
    for seed, (name, width, accuracy) in enumerate(
        [("small", 0.125, 0.80), ("big", 0.25, 0.85), ("plain", 0.125, 0.7)]
    ):
        path, sha = write_variant(work, width, accuracy, seed)
        files[sha], held[sha] = path.read_bytes(), variant.load(path, expected_sha256=sha)
        info = portfolio_pb2.VariantInfo(
            variant_id=sha, sha256=sha, size_bytes=len(files[sha]), name=name, accuracy=accuracy, params=1,
            precision="float32", signature=signer.sign(sha),
        )  # fmt: skip
        if name != "plain":
            onnx = onnx_export.export(held[sha].model, held[sha].spec, sha)
            info.onnx_id, info.onnx_size_bytes = sha256_bytes(onnx), len(onnx)
            info.onnx_signature, files[info.onnx_id] = signer.sign(info.onnx_id), onnx
        infos.append(info)
    config = quantize.QuantizeConfig(calibration_images=64)
    test = datasets.Split(fashion_mnist.test.images[:100], fashion_mnist.test.labels[:100])
    calibration = quantize.calibration_sample(fashion_mnist.train, config)
    int8 = quantize.quantize_int8(files[infos[0].onnx_id], calibration, test, config)
    int8_id = sha256_bytes(int8)
    files[int8_id] = int8
    infos.append(
        portfolio_pb2.VariantInfo(
            variant_id=int8_id,
            sha256=int8_id,
            size_bytes=len(int8),
            name="small-int8",
            accuracy=0.79,
            params=1,
            signature=signer.sign(int8_id),
            onnx_id=int8_id,
            onnx_size_bytes=len(int8),
            onnx_signature=signer.sign(int8_id),
            precision="int8",
            parent_id=infos[0].variant_id,
        )  # fmt: skip
    )
    return files, infos, key, held


@pytest.fixture
def agents(listing, tmp_path):
    """Start an agent of a backend against a fake cloud serving `listing`; stops them all after the test."""
    files, infos, key, _ = listing
    public = tmp_path / "signing.pub"
    public.write_bytes(Signer(key).public_pem())
    started = []

    def start(backend: str, listed=None, **settings):
        cloud = FakeCloud(files, listed if listed is not None else infos, signer=Signer(key))  # listings signed too
        stopping = threading.Event()
        config = AgentConfig(
            cloud=cloud.start(), name=f"edge-{backend}", cache_dir=tmp_path / backend, profile_iters=3, batch=4,
            backoff_s=0.05, max_backoff_s=0.2, fetch_attempts=2, backend=backend, verify_key=public, **settings,
        )  # fmt: skip
        node = assemble(config, stopping, Transport.plaintext())
        started.append((cloud, stopping, node))
        assert initial_portfolio(node.agent, node.link)
        node.agent.start_serving()
        threading.Thread(target=node.link.run, args=(node.agent,), daemon=True).start()
        return cloud, node

    yield start
    for cloud, stopping, node in started:
        stopping.set()
        node.close()
        cloud.stop()


def _metric(node, name: str) -> float:
    text = urllib.request.urlopen(f"http://{node.metrics_address}/metrics", timeout=10).read().decode()
    return next(float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_each_backend_holds_fetches_and_offers_only_what_it_serves(listing, agents, backend):
    files, infos, _, _ = listing
    cloud, node = agents(backend)
    by_name = {v.name: v for v in infos}
    served = {"torch": ("small", "big", "plain"), "onnxruntime": ("small", "big", "small-int8")}[backend]
    wanted = {by_name[name].variant_id for name in served}
    assert {o.variant_id for o in node.agent.options()} == set(node.agent.runtime.variants()) == wanted
    suffix = {"torch": ".safetensors", "onnxruntime": ".onnx"}[backend]
    cached = {p.name for p in node.agent.config.cache_dir.iterdir() if not p.name.startswith(".")}
    fetched = {by_name[n].variant_id if backend == "torch" else by_name[n].onnx_id for n in served}
    assert cached == {f"{file_id}{suffix}" for file_id in fetched}  # only the files this backend serves
    assert _metric(node, f'prunefleet_edge_members_left_out{{backend="{backend}",edge="edge-{backend}"}}') == 1
    # it reports the listing's id, that of every member, though it holds only those it serves
    node.agent.decide_once()
    telemetry = wait_for(
        lambda: [r.telemetry for r in list(cloud.reports) if r.WhichOneof("body") == "telemetry"], what="telemetry"
    )
    assert telemetry[-1].portfolio_id == portfolio_id(v.variant_id for v in infos)
    kinds = {node.agent.runtime.resident()[v].backend for v in wanted}
    assert kinds == {backend}


def test_the_onnx_backend_refuses_files_signed_wrongly_or_naming_another_member(listing, agents):
    files, infos, _, _ = listing
    small, big = infos[0], infos[1]
    forged = portfolio_pb2.VariantInfo()
    forged.CopyFrom(small)
    forged.onnx_signature = big.onnx_signature  # a signature, but over another file
    swapped = portfolio_pb2.VariantInfo()
    swapped.CopyFrom(big)
    swapped.variant_id = swapped.sha256 = infos[2].variant_id  # big's ONNX file listed as another variant's
    swapped.name = "swapped"
    _, node = agents("onnxruntime", listed=[forged, swapped, infos[3]])
    assert set(node.agent.runtime.variants()) == {infos[3].variant_id}  # only the int8 member was right


def test_onnx_answers_agree_with_the_torch_variant_on_real_images(listing, agents, fashion_mnist):
    _, infos, _, held = listing
    cloud, node = agents("onnxruntime")
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(node.address))
    images = fashion_mnist.test.images[:64].numpy()
    for info in infos[:2]:  # the float32 members with ONNX files
        node.agent.runtime.switch(info.variant_id, "test")
        reply = stub.Predict(inference_pb2.PredictRequest(input=to_proto(images)), timeout=30)
        got = from_proto(reply.output)
        spec = held[info.variant_id].spec
        x = (torch.from_numpy(images).float() / 255 - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(
            spec.std
        ).view(1, -1, 1, 1)
        with torch.no_grad():
            want = held[info.variant_id].model.eval()(x).numpy()
        assert reply.variant_id == info.variant_id
        assert np.abs(got - want).max() <= 1e-4 and (got.argmax(1) == want.argmax(1)).all()


def test_onnx_members_load_on_demand_under_a_memory_budget(listing, tmp_path):
    files, infos, _, _ = listing
    backend = backends.create(backends.ONNXRUNTIME, BackendSettings(threads=1))
    served = offer(backend, infos).served
    held = {artifact.file_id: backend.held_bytes(artifact) for _, artifact in served}
    assert all(held[a.file_id] > a.size_bytes for _, a in served)  # a session holds more than its file
    budget = int(1.2 * max(held.values()))
    runtime = Runtime(RuntimeConfig(memory_budget_bytes=budget))
    for listed, artifact in served:
        path = tmp_path / f"{artifact.file_id}.onnx"
        path.write_bytes(files[artifact.file_id])
        loader = backend.loader(variant_info(listed, held[artifact.file_id]), artifact, path)
        ready = loader()
        assert ready.memory_bytes == held[artifact.file_id] == ready.info.size_bytes
        runtime.add(ready, loader)
        runtime.switch(listed.variant_id, "arrival")
    assert len(runtime.resident()) < len(served) <= len(runtime.variants())
    first = served[0][0].variant_id
    record = runtime.switch(first, "back")
    assert record.load_s > 0 and record.evicted  # loaded again from its file, another evicted for it
    assert runtime.resident_bytes() <= budget
    logits, answered = runtime.predict(np.zeros((2, 1, 28, 28), np.uint8))
    assert answered == first and logits.shape == (2, 10) and logits.dtype == np.float32


def test_backends_are_named_and_the_default_is_torch_where_it_imports():
    assert set(backends.BACKENDS) == {"torch", "onnxruntime"} and backends.default() == "torch"
    with pytest.raises(KeyError, match="known: onnxruntime, torch"):
        backends.create("tflite", BackendSettings())
    with pytest.raises(ValueError, match="backend must be one of"):
        AgentConfig(cloud="c:1", name="e", cache_dir=".", backend="tflite")
    assert backends.allowed_models("onnxruntime", ["x.y:z"]) == ()
    assert backends.allowed_models("torch", ["x.y:z"]) == ("x.y:z",)


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # importing torch fails from here on
from edge import backends, cli, node
from edge.backends.base import BackendSettings
made = backends.create(backends.default(), BackendSettings())
args = cli._parser().parse_args(["run", "--cloud", "c:1", "--name", "e", "--cache", "c", "--allow-model", "a.b:c"])
print(made.name, cli._config(args, cli.allowed_models(args, {})).backend, cli.allowed_models(args, {}))
"""


def test_where_torch_does_not_import_the_agent_serves_with_onnx_runtime():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["onnxruntime", "onnxruntime", "()"]
