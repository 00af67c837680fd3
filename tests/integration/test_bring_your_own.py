"""Bring your own images and model, end to end. Real Fashion-MNIST test images are written as PNG files
into a class-per-folder tree in colour and padded to 28x36; a user trains a small model on them and
saves its weights; `prunefleet portfolio build --dataset imagefolder --weights` builds a portfolio
whose level 0 scores exactly what the user's model scores on the same images; an edge serves it and
`prunefleet predict` on one of the files gets the label the cloud's own variant gives. torchvision's
resnet18 and mobilenet_v2 go through the same path."""

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import wait_for
from safetensors.torch import save_file

from bench.imagetree import folder_names, write_image_tree
from cloud.admin import predict_client
from cloud.build import data as build_data
from cloud.build.images import open_image, preprocess
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, evaluate, train
from cloud.localfleet import commands, processes
from common import models, variant
from common.datasets import FASHION_MNIST, normalize
from common.security import Transport
from protos import inference_pb2_grpc

pytestmark = pytest.mark.integration
PRUNEFLEET = str(Path(sys.executable).parent / "prunefleet")
IMAGES = 500  # 400 train, 50 validation, 50 test after the seeded split of one tree
INPUT_SIZE = (28, 36)
PLAIN = Transport.plaintext()
CLASSES = folder_names(FASHION_MNIST.classes)  # one folder per class: 'T-shirt/top' cannot name one


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([PRUNEFLEET, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tree(fashion_mnist, tmp_path_factory) -> Path:
    test = fashion_mnist.test
    root = tmp_path_factory.mktemp("byo") / "images"
    return write_image_tree(test.images[:IMAGES].numpy(), test.labels[:IMAGES].numpy(), CLASSES, root, INPUT_SIZE, True)


def _build(tree: Path, out: Path, model: str, *extra: str) -> PortfolioStore:
    size = ",".join(map(str, INPUT_SIZE))
    common = ("--dataset", "imagefolder", "--data-dir", str(tree), "--input-size", size, "--workers", "0")
    recipe = ("--epochs", "1", "--batch-size", "50", "--check-images", "16", "--no-progress")
    _run("portfolio", "build", "--out", str(out), "--model", model, *common, *recipe, *extra)
    return PortfolioStore(out)


def _serve_and_predict(store: PortfolioStore, image: Path, run: Path) -> tuple[dict, np.ndarray]:
    """Start a cloud and one edge on `store`, run `prunefleet predict --json` on `image` once the edge
    serves, and return its answer with the logits of the variant that answered, run here on the same
    file's pixels."""
    children = processes.start_cluster(
        processes.Launch("cloud", commands.cloud_args(store.root, db=run / "fleet.sqlite", certs=None)),
        lambda cloud: [processes.Launch("edge", commands.edge_args(cloud, "byo", cache=run / "cache", certs=None))],
        run / "logs",
    )
    try:
        edge = children[1].address
        wait_for(lambda: _serving(edge), timeout_s=120, what="the edge to serve a variant")
        answer = json.loads(_run("predict", "--edge", edge, "--insecure", "--json", str(image)).stdout)[0]
    finally:
        processes.stop_all(children)
    served = variant.load(store.variant_path(answer["variant_id"]))
    pixels = torch.from_numpy(preprocess(open_image(image), served.spec.input_shape)).unsqueeze(0)
    with torch.no_grad():
        logits = served.model(normalize(pixels, served.spec.mean, served.spec.std))
    return answer, logits[0].numpy()


def _serving(edge: str) -> bool:
    channel = PLAIN.channel(edge)
    try:
        return bool(predict_client.describe(inference_pb2_grpc.InferenceServiceStub(channel)).variant_id)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _agrees(logits: np.ndarray, index: int) -> bool:
    """The cloud's argmax, or a class scored as high within rounding (an edge serving a BatchNorm-folded
    model may order an exact tie the other way)."""
    return bool(logits[index] >= logits.max() - 1e-4)


def _one_test_image(tree: Path, store: PortfolioStore) -> Path:
    """A PNG file of the portfolio's test split."""
    data = build_data.load("imagefolder", tree, input_size=INPUT_SIZE, seed=0)
    return Path(data.test.source.samples[int(data.test.indices[0])][0])


def test_user_weights_on_user_images_build_serve_and_predict(tree, tmp_path):
    data = build_data.load("imagefolder", tree, input_size=INPUT_SIZE, seed=0)
    assert data.info.input_shape == (3, *INPUT_SIZE) and data.info.classes == CLASSES
    torch.manual_seed(0)
    user_model = models.build("vgg11", models.zoo_kwargs(data.info.input_shape, 10, 0.125))
    train(user_model, data.info, data.train, TrainConfig(epochs=2, batch_size=50, progress=False))
    save_file({k: v.contiguous() for k, v in user_model.state_dict().items()}, tmp_path / "user.safetensors")
    weights = ("--weights", str(tmp_path / "user.safetensors"), "--levels", "1")
    store = _build(tree, tmp_path / "portfolio", "vgg11", "--width", "0.125", *weights)
    level0 = min(store.manifest().variants, key=lambda v: v.level)
    assert level0.level == 0 and level0.accuracy == evaluate(user_model, data.info, data.test)
    answer, logits = _serve_and_predict(store, _one_test_image(tree, store), tmp_path / "run")
    assert _agrees(logits, answer["predictions"][0]["index"])
    assert answer["predictions"][0]["class"] == CLASSES[answer["predictions"][0]["index"]]


@pytest.mark.parametrize("arch", ["torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_torchvision_models_build_serve_and_predict(arch, tree, tmp_path):
    """Untrained (--epochs 0: what is checked is the path, not accuracy); only the pruned level is kept,
    so the edge fetches the small variant."""
    prune = ("--epochs", "0", "--levels", "1", "--rate", "0.99", "--targets", "100")
    store = _build(tree, tmp_path / "portfolio", arch, *prune)
    (entry,) = store.manifest().variants
    dense = models.build(arch, models.zoo_kwargs((3, *INPUT_SIZE), 10, arch=arch))
    assert entry.level == 1 and entry.arch == arch
    assert entry.params < models.count_params(dense)  # surgery removed dead channels
    answer, logits = _serve_and_predict(store, _one_test_image(tree, store), tmp_path / "run")
    assert answer["variant_id"] == entry.variant_id and _agrees(logits, answer["predictions"][0]["index"])
