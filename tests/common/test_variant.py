import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_batchnorm_statistics, spec_for

from common import models, variant
from common.files import sha256_bytes

KWARGS = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": 0.125}


def _consistent_small(arch: str) -> torch.nn.Module:
    import torch_pruning as tp

    torch.manual_seed(0)
    kwargs = dict(KWARGS, width=0.25)
    model = models.build(arch, kwargs).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 28, 28))
    for group in list(
        graph.get_all_groups(ignored_layers=[m for m in model.modules() if isinstance(m, torch.nn.Linear)])
    ):
        root = group[0].dep.target.module
        n = len(group[0].idxs)
        if n > 2:
            graph.get_pruning_group(root, group[0].dep.handler, list(range(0, n, 3))).prune()
    return model, kwargs


@pytest.mark.parametrize("arch", ["vgg11", "resnet20"])
def test_round_trip_in_a_separate_process_gives_the_same_outputs(arch, tmp_path):
    model, kwargs = _consistent_small(arch)
    random_batchnorm_statistics(model)
    path = tmp_path / "v.safetensors"
    sha = variant.save(model, spec_for(arch, kwargs), path)
    x = torch.randn(4, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    code = (
        "import sys, torch; from common import variant\n"
        "v = variant.load(sys.argv[1], expected_sha256=sys.argv[2])\n"
        "x = torch.load(sys.argv[3], weights_only=True)\n"
        "with torch.no_grad(): torch.save(v.model(x), sys.argv[4])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), sha, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True
    )
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, expected)
    assert models.count_params(variant.load(path).model) == models.count_params(model)


def test_sha256_mismatch_is_never_loaded(tmp_path):
    model = models.build("vgg11", KWARGS)
    path = tmp_path / "v.safetensors"
    sha = variant.save(model, spec_for("vgg11", KWARGS), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert sha256_bytes(bytes(data)) != sha
    with pytest.raises(variant.VariantError, match="sha256 does not match"):
        variant.load(path, expected_sha256=sha)


def _with_metadata(data: bytes, **changes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def test_architecture_outside_the_allow_list_is_refused():
    model = models.build("vgg11", KWARGS)
    data = variant.encode(model, spec_for("vgg11", KWARGS))
    spec = json.loads(_header(data)["__metadata__"]["spec"])
    spec["arch"] = "os.system"
    with pytest.raises(variant.VariantError, match="not on the allow-list"):
        variant.load_bytes(_with_metadata(data, spec=json.dumps(spec)))


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"", "shorter than"),
        (struct.pack("<Q", 1 << 40) + b"{}", "beyond the 16777216-byte limit"),
        (struct.pack("<Q", 64) + b"{}", "beyond the file"),
        (struct.pack("<Q", 2) + b"{}", "no metadata"),
    ],
)
def test_malformed_headers_are_refused(bad, message):
    with pytest.raises(variant.VariantError, match=message):
        variant.load_bytes(bad)


def test_wrong_format_and_mismatched_shapes_are_refused():
    model = models.build("vgg11", KWARGS)
    data = variant.encode(model, spec_for("vgg11", KWARGS))
    with pytest.raises(variant.VariantError, match="format"):
        variant.load_bytes(_with_metadata(data, format="other/9"))
    broken = models.build("vgg11", KWARGS)
    broken.classifier.weight = torch.nn.Parameter(torch.randn(10, 3))
    with pytest.raises(variant.VariantError, match="do not fit|do not match"):
        variant.load_bytes(variant.encode(broken, spec_for("vgg11", KWARGS)))


def test_unknown_tensor_is_refused():
    model = models.build("vgg11", KWARGS)
    model.register_buffer("smuggled", torch.zeros(3))
    with pytest.raises(variant.VariantError, match="has no place"):
        variant.load_bytes(variant.encode(model, spec_for("vgg11", KWARGS)))


def test_a_tensor_of_another_dtype_than_the_architecture_declares_is_refused():
    model = models.build("vgg11", KWARGS)
    model.features[1].running_mean = model.features[1].running_mean.double()
    refused = r"'features.1.running_mean' is torch.float64; vgg11 declares torch.float32"
    with pytest.raises(variant.VariantError, match=refused):
        variant.load_bytes(variant.encode(model, spec_for("vgg11", KWARGS)))


def test_only_a_file_of_a_known_sha256_may_skip_the_shape_check(tmp_path):
    path = tmp_path / "v.safetensors"
    sha = variant.save(models.build("vgg11", KWARGS), spec_for("vgg11", KWARGS), path)
    assert variant.load(path, expected_sha256=sha, check=False).sha256 == sha
    with pytest.raises(ValueError, match="known sha256"):
        variant.load(path, check=False)


def test_the_same_model_gives_the_same_bytes_in_every_process():
    """Variant ids are sha256 of the file: they must repeat across processes and builds."""
    code = (
        "import hashlib, torch; from common import models, variant; from helpers import spec_for; "
        "torch.manual_seed(0); m = models.build('vgg11', {'width': 0.125}); "
        "print(hashlib.sha256(variant.encode(m, spec_for('vgg11', {'width': 0.125}))).hexdigest())"
    )
    tests = str(Path(__file__).resolve().parents[1])
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": tests},
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(digests) == 1 and len(next(iter(digests))) == 64


def test_the_header_is_written_canonically():
    data = variant.encode(models.build("vgg11", {"width": 0.125}), spec_for("vgg11", {"width": 0.125}))
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length]
    canonical = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    assert header.rstrip(b" ") == canonical and length % 8 == 0
