"""The ONNX export of a variant: equal to the torch model on real and random inputs, self-describing,
the same bytes in every process, and a check that names what differs."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import random_batchnorm_statistics

from cloud.build import onnx_export
from common import datasets, models, variant

ROOT = Path(__file__).resolve().parents[3]


def _variant(arch: str, info: datasets.DatasetInfo, width: float = 0.125) -> variant.Variant:
    """A variant as `common.variant.load` gives it: a model with BatchNorm statistics away from their
    initial values, through its file and back."""
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": width}
    model = random_batchnorm_statistics(models.build(arch, kwargs)).eval()
    spec = variant.VariantSpec(
        arch, kwargs, info.input_shape, 10, info.mean, info.std, "shifter", 0.0, 0.5, name=f"{arch}-L0"
    )
    return variant.load_bytes(variant.encode(model, spec))


@pytest.fixture(scope="module")
def vgg(fashion_mnist) -> variant.Variant:
    return _variant("vgg11", fashion_mnist.info)


def _test_images(data: datasets.Dataset, spec: variant.VariantSpec, n: int = 128) -> torch.Tensor:
    return datasets.normalize(datasets.head(data.test, n), spec.mean, spec.std)


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_onnx_runtime_gives_the_torch_models_logits(fashion_mnist, arch):
    held = _variant(arch, fashion_mnist.info)
    data = onnx_export.export(held.model, held.spec, held.sha256)
    report = onnx_export.check(data, held.model, _test_images(fashion_mnist, held.spec))
    assert report.inputs == 128 + onnx_export.ExportConfig().random_inputs
    assert report.max_abs_diff <= 1e-4
    graph = onnx.load_from_string(data).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}  # folded at export
    assert [i.name for i in graph.input] == [onnx_export.INPUT]


def test_the_batch_dimension_is_dynamic(fashion_mnist, vgg):
    runner = onnx_export.session(onnx_export.export(vgg.model, vgg.spec, vgg.sha256))
    images = _test_images(fashion_mnist, vgg.spec, 40)
    with torch.inference_mode():
        want = vgg.model(images).numpy()
    for batch in (1, 7, 40):
        got = runner.run(None, {onnx_export.INPUT: images[:batch].numpy()})[0]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want[:batch], atol=1e-4, rtol=0)


def test_the_file_describes_itself_to_onnx_runtime(vgg):
    data = onnx_export.export(vgg.model, vgg.spec, vgg.sha256)
    meta = onnx_export.session(data).get_modelmeta().custom_metadata_map  # how an edge reads it, no onnx
    assert meta == {
        "format": onnx_export.FORMAT,
        "spec": vgg.spec.to_json(),
        "variant": vgg.sha256,
        "precision": onnx_export.FLOAT32,
    }
    assert onnx_export.spec_of(data) == vgg.spec
    assert onnx.load_from_string(data).opset_import[0].version == onnx_export.OPSET


EXPORT_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from cloud.build import onnx_export
from common import variant
held = variant.load(Path(sys.argv[1]))
Path(sys.argv[2]).write_bytes(onnx_export.export(held.model, held.spec, held.sha256))
"""


def test_the_same_variant_exports_to_the_same_bytes_in_every_process(vgg, tmp_path):
    variant_file = tmp_path / "v.safetensors"
    variant.save(vgg.model, vgg.spec, variant_file)
    here = onnx_export.export(vgg.model, vgg.spec, vgg.sha256)
    assert onnx_export.export(vgg.model, vgg.spec, vgg.sha256) == here
    subprocess.run(
        [sys.executable, "-c", EXPORT_IN_ANOTHER_PROCESS, str(variant_file), str(tmp_path / "there.onnx")],
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "7", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert (tmp_path / "there.onnx").read_bytes() == here


def _disagreement(message: str) -> tuple[float, int, int]:
    found = re.search(r"max abs diff (\S+) .*argmax differs on (\d+) of (\d+) inputs", message)
    assert found, message
    return float(found.group(1)), int(found.group(2)), int(found.group(3))


def test_a_file_that_differs_from_its_model_is_refused_naming_how(fashion_mnist):
    held = _variant("vgg11", fashion_mnist.info)
    data = onnx_export.export(held.model, held.spec, held.sha256)
    images = _test_images(fashion_mnist, held.spec)
    for shift, argmax_changes in ((1e-3, False), (20.0, True)):  # over the tolerance; then over other logits too
        with torch.no_grad():
            held.model.classifier.bias[3] += shift  # the torch model changes after its export
        with pytest.raises(onnx_export.ExportError, match=r"vgg11-L0 float32 \(") as caught:
            onnx_export.check(data, held.model, images)
        diff, disagree, inputs = _disagreement(str(caught.value))
        assert diff == pytest.approx(shift + (1e-3 if argmax_changes else 0), rel=1e-2)
        assert inputs == 128 + onnx_export.ExportConfig().random_inputs
        assert (disagree > 0) is argmax_changes


def test_bad_settings_and_ids_are_refused_by_name(vgg):
    with pytest.raises(ValueError, match="opset"):
        onnx_export.ExportConfig(opset=onnx_export.OPSET + 1)
    with pytest.raises(ValueError, match="atol"):
        onnx_export.ExportConfig(atol=float("nan"))
    with pytest.raises(ValueError, match="variant_id"):
        onnx_export.export(vgg.model, vgg.spec, "not-an-id")
    with pytest.raises(onnx_export.ExportError, match="format"):
        onnx_export.metadata(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString())
    assert ort.get_device() == "CPU"
