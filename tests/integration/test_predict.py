"""`prunefleet predict` and Describe against a real edge and cloud on loopback, over mutual TLS: the edge
first serves nothing (its cloud is not up yet), then a Fashion-MNIST portfolio. Every answer is checked
against the cloud's own compact model run on the same pixels."""

import json
import subprocess
import sys
import urllib.request
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from helpers import wait_for
from PIL import Image

from cloud.admin import certs
from cloud.build.images import open_image, preprocess
from cloud.build.store import PortfolioStore
from cloud.localfleet import commands, processes
from cloud.localfleet.cluster import free_port
from common import variant
from common.datasets import FASHION_MNIST
from common.security import Transport
from common.wire import to_proto
from protos import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration
PRUNEFLEET = str(Path(sys.executable).parent / "prunefleet")
IMAGES = 24


def _describe(address: str, transport: Transport) -> inference_pb2.DescribeResponse:
    channel = transport.channel(address)
    try:
        return inference_pb2_grpc.InferenceServiceStub(channel).Describe(inference_pb2.DescribeRequest(), timeout=10)
    finally:
        channel.close()


def _refusal(address: str, transport: Transport) -> grpc.RpcError | None:
    """The edge's own refusal of Describe, or None while nothing listens there yet."""
    try:
        _describe(address, transport)
    except grpc.RpcError as err:
        return err if "no variant" in (err.details() or "") else None
    raise AssertionError("the edge described a variant before its cloud was up")


def _serving(address: str, transport: Transport) -> bool:
    try:
        return bool(_describe(address, transport).variant_id)
    except grpc.RpcError:
        return False


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PRUNEFLEET, "predict", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def images(fashion_mnist, tmp_path_factory) -> list[str]:
    """Real Fashion-MNIST test images as PNG files, and one of them as a larger RGB image."""
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for i, pixels in enumerate(fashion_mnist.test.images[:IMAGES]):
        path = directory / f"test-{i}.png"
        Image.fromarray(pixels[0].numpy()).save(path)
        paths.append(str(path))
    large = directory / "large-rgb.png"
    Image.fromarray(fashion_mnist.test.images[0, 0].numpy()).convert("RGB").resize((84, 56)).save(large)
    return [*paths, str(large)]


@pytest.fixture(scope="module")
def fleet(small_portfolio, images, tmp_path_factory):
    """An edge started before its cloud: it listens but serves nothing (it prints its serving line only
    once it does), and what it answers then is kept; then the cloud comes up and the edge serves."""
    run = tmp_path_factory.mktemp("predict")
    keys = certs.init(run / "certs")
    operator = Transport.load(keys["client"])  # Predict and Describe take a client certificate
    cloud_port, edge_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    address = f"127.0.0.1:{edge_port}"
    edge_args = commands.edge_args(
        f"127.0.0.1:{cloud_port}",
        "edge-p",
        cache=run / "cache",
        certs=certs.issue_holder(run / "certs", "edge", "edge-p"),
        port=edge_port,
    )
    cloud_args = commands.cloud_args(small_portfolio, db=run / "fleet.sqlite", certs=keys["cloud"], port=cloud_port)
    children = []
    with futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(processes.start, "edge", edge_args, run / "logs")
        try:
            before = wait_for(lambda: _refusal(address, operator), timeout_s=90, what="the edge listening")
            before_cli = _predict("--edge", address, "--certs", str(keys["client"]), images[0])
            children.append(processes.start("cloud", cloud_args, run / "logs"))
        finally:
            try:
                children.append(starting.result())  # the edge, serving once its cloud is up
            except processes.ProcessError:
                processes.stop_all(children)
                raise
    try:
        wait_for(lambda: _serving(address, operator), timeout_s=60, what="the edge serving a variant")
        yield SimpleNamespace(
            edge=children[-1], keys=keys, operator=operator, before=before, before_cli=before_cli, store=small_portfolio
        )
    finally:
        processes.stop_all(children)


@pytest.fixture(scope="module")
def expected(fleet, images):
    """Per variant of the portfolio: the cloud's compact model's probabilities on every image."""
    store = PortfolioStore(fleet.store)
    answers = {}
    for entry in store.manifest().variants:
        held = variant.load(store.variant_path(entry.variant_id), expected_sha256=entry.variant_id)
        spec = held.spec
        pixels = np.stack([preprocess(open_image(path), spec.input_shape) for path in images])
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        with torch.inference_mode():
            logits = held.model.eval()((torch.from_numpy(pixels).float() / 255 - mean) / std)
        answers[entry.variant_id] = torch.softmax(logits.double(), dim=1).numpy()
    return answers


def _certs(fleet) -> list[str]:
    return ["--edge", fleet.edge.address, "--certs", str(fleet.keys["client"])]


def _requests_served(fleet) -> float:
    text = urllib.request.urlopen(f"http://{fleet.edge.metrics_address}/metrics", timeout=10).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("prunefleet_edge_requests_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def _agrees(probabilities: np.ndarray, index: int) -> bool:
    """The cloud's argmax, or a class as probable as it within rounding (optimized serving may reorder a tie)."""
    return probabilities[index] >= probabilities.max() - 1e-4


def test_before_any_variant_describe_and_predict_are_unavailable(fleet):
    assert fleet.before.code() == grpc.StatusCode.UNAVAILABLE and "no variant" in fleet.before.details()
    assert fleet.before_cli.returncode == 1, fleet.before_cli.stderr
    assert "UNAVAILABLE" in fleet.before_cli.stderr and fleet.edge.address in fleet.before_cli.stderr
    assert fleet.before_cli.stdout == ""


def test_describe_answers_the_serving_spec_with_fashion_mnist_class_names(fleet):
    reply = _describe(fleet.edge.address, fleet.operator)
    store = PortfolioStore(fleet.store)
    assert reply.variant_id in {v.variant_id for v in store.manifest().variants}
    spec = variant.load(store.variant_path(reply.variant_id), expected_sha256=reply.variant_id).spec
    assert tuple(reply.input_shape) == spec.input_shape == (1, 28, 28)
    assert (tuple(reply.mean), tuple(reply.std)) == (spec.mean, spec.std)
    assert tuple(reply.classes) == spec.classes == FASHION_MNIST.classes
    assert reply.num_classes == 10 and reply.max_batch >= 1 and reply.name


def test_describe_needs_a_client_certificate_like_predict(fleet):
    ca = fleet.keys["operator"] / "ca.pem"
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    for channel in (
        grpc.secure_channel(fleet.edge.address, no_client_cert),
        grpc.insecure_channel(fleet.edge.address),
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for call, request in (
            (stub.Describe, inference_pb2.DescribeRequest()),
            (stub.Predict, inference_pb2.PredictRequest(input=to_proto(np.zeros((1, 1, 28, 28), np.uint8)))),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()


def test_an_edge_serves_client_and_operator_certificates_only(fleet):
    """Another edge's certificate (or the cloud's, were it a client) is refused; the operator's, sent
    as to an edge (without its token), is served."""
    other = Transport.load(certs.issue_holder(fleet.keys["cloud"].parent, "edge", "edge-q")).for_edges()
    with pytest.raises(grpc.RpcError) as err:
        _describe(fleet.edge.address, other)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "client" in err.value.details()
    assert _describe(fleet.edge.address, Transport.load(fleet.keys["operator"]).for_edges()).variant_id


def test_predict_prints_the_class_the_cloud_model_finds(fleet, images, expected):
    result = _predict(*_certs(fleet), *images)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == images
    answered = [v for v in expected if v[:12] in result.stderr]
    assert answered, result.stderr
    names = list(FASHION_MNIST.classes)
    for line, row in zip(lines, range(len(images)), strict=True):
        _, name, probability = line.split("\t")
        index = names.index(name)
        assert any(_agrees(expected[v][row], index) for v in answered), line
        assert any(abs(float(probability) - expected[v][row][index]) < 2e-3 for v in answered), line


def test_predict_json_gives_each_image_its_variant_and_top_k(fleet, images, expected):
    result = _predict(*_certs(fleet), "--json", "--top", "3", *images)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [item["image"] for item in document] == images
    for row, item in enumerate(document):
        probabilities = expected[item["variant_id"]][row]
        guesses = item["predictions"]
        assert len(guesses) == 3 and guesses[0]["probability"] >= guesses[1]["probability"] >= guesses[2]["probability"]
        assert _agrees(probabilities, guesses[0]["index"])
        for guess in guesses:
            assert guess["class"] == FASHION_MNIST.classes[guess["index"]]
            assert guess["probability"] == pytest.approx(probabilities[guess["index"]], abs=2e-3)


def test_an_unreadable_image_exits_2_naming_it_and_sends_nothing(fleet, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    served = _requests_served(fleet)
    result = _predict(*_certs(fleet), images[0], str(broken))
    assert result.returncode == 2 and "broken.jpg" in result.stderr and result.stdout == ""
    assert _requests_served(fleet) == served


def test_an_unreachable_edge_exits_1_saying_so(images):
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    result = _predict("--edge", address, "--insecure", images[0])
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr and address in result.stderr
