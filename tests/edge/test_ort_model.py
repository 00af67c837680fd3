"""Serving an ONNX variant without torch: a process that cannot import torch (nor onnx) opens exported
files and serves them with the torch edge's normalization; files that refer to data outside themselves,
or that do not describe themselves, are refused before ONNX Runtime runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import random_batchnorm_statistics

from cloud.build import onnx_export, quantize
from common import datasets, models, onnx_format, variant
from common.files import sha256_bytes
from common.wire import TensorError, pixels_to_unit
from edge import ort_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(fashion_mnist, tmp_path_factory) -> tuple[variant.Variant, Path, Path]:
    """A VGG-11 variant as loaded, and its float32 and int8 ONNX files."""
    torch.manual_seed(0)
    info = fashion_mnist.info
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}
    model = random_batchnorm_statistics(models.build("vgg11", kwargs))
    spec = variant.VariantSpec(
        "vgg11", kwargs, info.input_shape, 10, info.mean, info.std, "shifter", 0.0, 0.5, name="vgg11-L0"
    )
    held = variant.load_bytes(variant.encode(model, spec))
    float32 = onnx_export.export(held.model, held.spec, held.sha256)
    config = quantize.QuantizeConfig(calibration_images=64)
    calibration = quantize.calibration_sample(fashion_mnist.train, config)
    test = datasets.Split(fashion_mnist.test.images[:100], fashion_mnist.test.labels[:100])
    work = tmp_path_factory.mktemp("onnx")
    (work / "float32.onnx").write_bytes(float32)
    (work / "int8.onnx").write_bytes(quantize.quantize_int8(float32, calibration, test, config))
    return held, work / "float32.onnx", work / "int8.onnx"


SERVE_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch (or onnx) fails from here on
sys.modules["onnx"] = None
from pathlib import Path
import numpy as np
from edge import ort_model
work = Path(sys.argv[1])
pixels = np.load(work / "pixels.npy")
for name in ("float32", "int8"):
    served = ort_model.open_file(work / f"{name}.onnx", ort_model.OrtConfig(threads=1), sys.argv[2 + (name == "int8")])
    assert served.precision == name, served
    np.save(work / f"{name}-logits.npy", served.run(pixels))
    np.save(work / f"{name}-unit-logits.npy", served.run(pixels.astype(np.float32) / np.float32(255)))
"""


def test_a_process_without_torch_serves_both_precisions(files, fashion_mnist):
    held, float32, int8 = files
    work = float32.parent
    pixels = datasets.head(fashion_mnist.test, 64)
    np.save(work / "pixels.npy", pixels.numpy())
    ids = [sha256_bytes(path.read_bytes()) for path in (float32, int8)]
    subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(work), *ids],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    x = datasets.normalize(pixels, held.spec.mean, held.spec.std)
    with torch.inference_mode():
        want = held.model(x).numpy()
    got = np.load(work / "float32-logits.npy")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_array_equal(np.load(work / "float32-unit-logits.npy"), got)
    # int8: the edge gives what the cloud's own session gives on the same normalized images
    cloud_int8 = onnx_export.outputs(onnx_export.session(int8.read_bytes()), x)
    np.testing.assert_array_equal(np.load(work / "int8-logits.npy"), cloud_int8)


def test_inputs_are_normalized_as_the_torch_edge_normalizes_them(files, fashion_mnist):
    held, float32, _ = files
    served = ort_model.open_file(float32)
    pixels = datasets.head(fashion_mnist.test, 8).numpy()
    mean = torch.tensor(held.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(held.spec.std).view(1, -1, 1, 1)
    as_torch_edge = ((torch.from_numpy(pixels_to_unit(pixels)) - mean) / std).numpy()  # edge.runtime's way
    np.testing.assert_array_equal(served.prepare(pixels), as_torch_edge)
    assert served.spec == held.spec and served.spec.precision == "float32"  # the variant file's own spec
    assert served.variant_id == held.sha256 and served.parent is None


def test_bad_batches_are_refused_naming_the_expected_input(files):
    served = ort_model.open_file(files[1], ort_model.OrtConfig(max_batch=4))
    for batch in (
        np.zeros((1, 1, 28, 28), dtype=np.int16),
        np.zeros((1, 1, 27, 28), dtype=np.uint8),
        np.zeros((0, 1, 28, 28), dtype=np.uint8),
        np.zeros((5, 1, 28, 28), dtype=np.uint8),
        np.zeros((28, 28), dtype=np.float32),
    ):
        with pytest.raises(TensorError, match=r"expected shape \[N, 1, 28, 28\] with 1 <= N <= 4"):
            served.run(batch)
    with pytest.raises(TensorError, match="NaN"):
        served.run(np.full((1, 1, 28, 28), np.nan, dtype=np.float32))


def _external(tensor: onnx.TensorProto, location: str, with_data_location: bool = True) -> None:
    """Make `tensor` refer to its bytes at `location` instead of holding them."""
    size = len(tensor.raw_data) or 4 * int(np.prod(tensor.dims))
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    if with_data_location:
        tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _constant(location: str) -> onnx.NodeProto:
    tensor = onnx.numpy_helper.from_array(np.zeros(4, dtype=np.float32), "c")
    _external(tensor, location)
    return onnx.helper.make_node("Constant", [], ["unused"], value=tensor)


def _sparse(location: str) -> onnx.SparseTensorProto:
    values = onnx.numpy_helper.from_array(np.ones(1, dtype=np.float32), "s")
    _external(values, location)
    indices = onnx.numpy_helper.from_array(np.zeros(1, dtype=np.int64), "s_indices")
    return onnx.helper.make_sparse_tensor(values, indices, [4])


def _with_external_data(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    if where == "initializer":
        _external(proto.graph.initializer[0], "weights.bin")
    elif where == "external_data entries only":
        _external(proto.graph.initializer[0], "weights.bin", with_data_location=False)
    elif where == "node attribute":
        proto.graph.node.append(_constant("weights.bin"))
    elif where == "sparse initializer":
        proto.graph.sparse_initializer.append(_sparse("weights.bin"))
    else:  # a function's node
        body = onnx.helper.make_function("local", "f", [], ["unused"], [_constant("weights.bin")], [])
        proto.functions.append(body)
    return proto


@pytest.mark.parametrize(
    "where", ["initializer", "external_data entries only", "node attribute", "sparse initializer", "function"]
)
def test_a_file_referring_to_data_outside_itself_is_refused(files, tmp_path, monkeypatch, where):
    proto = onnx.load_from_string(files[1].read_bytes())
    weights = proto.graph.initializer[0].raw_data
    crafted = _with_external_data(proto, where).SerializeToString()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(weights)
    if where == "initializer":  # ONNX Runtime alone reads it from the working directory
        ort.InferenceSession(crafted, providers=["CPUExecutionProvider"])
    with pytest.raises(ort_model.OrtModelError, match="external data"):
        ort_model.open_bytes(crafted)


def _with_metadata(data: bytes, **changes: str | None) -> bytes:
    proto = onnx.load_from_string(data)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(changes)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {k: v for k, v in props.items() if v is not None})
    return proto.SerializeToString()


def test_files_that_do_not_describe_themselves_are_refused(files):
    _, float32, int8 = files
    good, quantized = float32.read_bytes(), int8.read_bytes()
    other_shape = json.loads(onnx_export.metadata(good)["spec"]) | {"input_shape": [1, 32, 32]}
    cases = [
        (good[: len(good) // 2], "not an ONNX model|ONNX Runtime refuses"),
        (_with_metadata(good, format=None), "format"),
        (_with_metadata(good, precision="int4"), "precision"),
        (_with_metadata(good, variant="e0af"), "names no variant"),
        (_with_metadata(quantized, parent=None), "parent"),
        (_with_metadata(good, precision="int8", parent="0" * 64), "the spec says 'float32'"),
        (_with_metadata(good, spec=json.dumps(other_shape)), r"the spec says \[batch, \(1, 32, 32\)\]"),
        (
            _with_metadata(good, spec=json.dumps(other_shape | {"std": [0.0]})),
            "spec is malformed: std must be positive",
        ),
    ]
    for data, problem in cases:
        with pytest.raises(ort_model.OrtModelError, match=problem):
            ort_model.open_bytes(data)
    with pytest.raises(ort_model.OrtModelError, match="over the"):
        ort_model.open_bytes(good, ort_model.OrtConfig(max_bytes=len(good) - 1))
    with pytest.raises(ort_model.OrtModelError, match="sha256"):
        ort_model.open_file(float32, expected_sha256="0" * 64)


def test_settings_and_formats_agree_with_the_cloud():
    assert onnx_export.FORMAT is onnx_format.FORMAT and onnx_export.MAX_ONNX_BYTES is onnx_format.MAX_ONNX_BYTES
    assert onnx_format.PRECISIONS == (onnx_export.FLOAT32, onnx_export.INT8)
    assert ort_model.MAX_ONNX_BYTES == onnx_format.MAX_ONNX_BYTES == variant.MAX_VARIANT_BYTES
    with pytest.raises(ValueError, match="threads"):
        ort_model.OrtConfig(threads=0)
    with pytest.raises(ValueError, match="max_bytes"):
        ort_model.OrtConfig(max_bytes=0)
