"""int8 variants: calibrated on training images, their accuracy measured with ONNX Runtime, marked as
int8 with their parent, the same bytes in every process, and only float32 files quantized."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cloud.build import onnx_export, quantize
from cloud.build.train import TrainConfig, evaluate, train
from common import datasets, models, variant
from common.files import sha256_bytes
from common.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[3]
CALIBRATION = quantize.QuantizeConfig(calibration_images=256)


@pytest.fixture(scope="module")
def trained(fashion_mnist) -> tuple[variant.Variant, bytes]:
    """A VGG-11 at width 1/8 trained briefly (800 Fashion-MNIST images), as loaded, and its ONNX file."""
    torch.manual_seed(0)
    info = fashion_mnist.info
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on a busy machine, more make a short run wait on each other
    try:
        model = train(
            models.build("vgg11", kwargs),
            info,
            fashion_mnist.train.subset(800, 0),
            TrainConfig(epochs=1, batch_size=32, lr=0.02, progress=False),
        )
    finally:
        torch.set_num_threads(threads)
    accuracy = evaluate(model, info, _test_part(fashion_mnist))
    spec = variant.VariantSpec(
        "vgg11", kwargs, info.input_shape, 10, info.mean, info.std, "shifter", 0.0, accuracy, name="vgg11-L0"
    )
    held = variant.load_bytes(variant.encode(model, spec))
    return held, onnx_export.export(held.model, held.spec, held.sha256)


def _test_part(data: datasets.Dataset, n: int = 2000) -> datasets.Split:
    return datasets.Split(data.test.images[:n], data.test.labels[:n])


@pytest.fixture(scope="module")
def int8(trained, fashion_mnist) -> bytes:
    _, float32 = trained
    images = quantize.calibration_sample(fashion_mnist.train, CALIBRATION)
    return quantize.quantize_int8(float32, images, _test_part(fashion_mnist), CALIBRATION)


def test_onnx_accuracy_is_the_torch_models(trained, fashion_mnist):
    held, float32 = trained
    part = _test_part(fashion_mnist)
    assert quantize.accuracy(float32, part) == pytest.approx(evaluate(held.model, fashion_mnist.info, part), abs=1e-6)


def test_int8_keeps_the_accuracy_and_says_what_it_is(trained, int8, fashion_mnist):
    held, float32 = trained
    part = _test_part(fashion_mnist)
    meta = onnx_export.metadata(int8)
    assert (meta["precision"], meta["parent"], meta["variant"]) == ("int8", sha256_bytes(float32), held.sha256)
    spec = onnx_export.spec_of(int8)
    assert spec.name == "vgg11-L0-int8"
    assert spec.extra["precision"] == "int8" and spec.extra["float32_accuracy"] == held.spec.accuracy
    assert spec.accuracy == quantize.accuracy(int8, part)  # measured, on the split it was given
    assert abs(spec.accuracy - quantize.accuracy(float32, part)) <= 0.02
    assert spec.accuracy > 0.3  # far above chance: the model is trained, and int8 kept it
    x = datasets.normalize(part.images[:500], spec.mean, spec.std)
    float_out = onnx_export.outputs(onnx_export.session(float32), x)
    int8_out = onnx_export.outputs(onnx_export.session(int8), x)
    assert (float_out.argmax(1) == int8_out.argmax(1)).mean() >= 0.95


def test_int8_weights_are_stored_as_int8_per_channel(int8, trained):
    graph = onnx.load_from_string(int8).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    for conv in convs:
        dequantize = next(node for node in graph.node if node.output[0] == conv.input[1])
        weight, scale = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel
    assert len(int8) < 0.4 * len(trained[1])


QUANTIZE_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
import numpy as np
import torch
from cloud.build import quantize
from common import datasets
work = Path(sys.argv[1])
images = torch.from_numpy(np.load(work / "calibration.npy"))
test = datasets.Split(torch.from_numpy(np.load(work / "x.npy")), torch.from_numpy(np.load(work / "y.npy")))
config = quantize.QuantizeConfig(calibration_images=len(images))
(work / "there.onnx").write_bytes(quantize.quantize_int8((work / "float32.onnx").read_bytes(), images, test, config))
"""


def test_the_same_inputs_quantize_to_the_same_bytes_in_every_process(trained, int8, fashion_mnist, tmp_path):
    _, float32 = trained
    images = quantize.calibration_sample(fashion_mnist.train, CALIBRATION)
    part = _test_part(fashion_mnist)
    (tmp_path / "float32.onnx").write_bytes(float32)
    np.save(tmp_path / "calibration.npy", images.numpy())
    np.save(tmp_path / "x.npy", part.images.numpy())
    np.save(tmp_path / "y.npy", part.labels.numpy())
    subprocess.run(
        [sys.executable, "-c", QUANTIZE_IN_ANOTHER_PROCESS, str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "11", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert (tmp_path / "there.onnx").read_bytes() == int8


def test_only_float32_files_are_quantized_and_only_they_are_checked(trained, int8, fashion_mnist):
    held, _ = trained
    images = quantize.calibration_sample(fashion_mnist.train, CALIBRATION)
    with pytest.raises(onnx_export.ExportError, match="only a float32 ONNX file is quantized"):
        quantize.quantize_int8(int8, images, _test_part(fashion_mnist, 10), CALIBRATION)
    with pytest.raises(onnx_export.ExportError, match="int8 is measured"):
        onnx_export.check(int8, held.model, torch.zeros(1, 1, 28, 28))


def test_calibration_images_and_settings_are_checked(trained, fashion_mnist):
    _, float32 = trained
    part = _test_part(fashion_mnist, 10)
    with pytest.raises(ValueError, match=r"uint8 \[N, 1, 28, 28\]"):
        quantize.quantize_int8(float32, torch.zeros(4, 1, 28, 28), part)
    with pytest.raises(ValueError, match=r"uint8 \[N, 1, 28, 28\]"):
        quantize.quantize_int8(float32, torch.zeros(4, 3, 28, 28, dtype=torch.uint8), part)
    with pytest.raises(UnknownNameError, match="minmax"):
        quantize.QuantizeConfig(method="entropy")
    with pytest.raises(ValueError, match="calibration_images"):
        quantize.QuantizeConfig(calibration_images=0)
    sample = quantize.calibration_sample(fashion_mnist.train, quantize.QuantizeConfig(calibration_images=64, seed=3))
    again = quantize.calibration_sample(fashion_mnist.train, quantize.QuantizeConfig(calibration_images=64, seed=3))
    assert sample.dtype == torch.uint8 and sample.shape == (64, 1, 28, 28) and torch.equal(sample, again)
