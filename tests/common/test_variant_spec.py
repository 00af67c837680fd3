"""The torch-free formats: a variant's spec read from any prefix of its file exactly when the prefix
holds the header, malformed headers refused by name, the ONNX metadata checked, and neither module
needing torch."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import spec_for

from common import models, onnx_format, variant, variant_spec
from common.variant_spec import VariantError, header_spec

ROOT = Path(__file__).resolve().parents[2]
KWARGS = {"in_channels": 3, "input_size": 32, "num_classes": 10, "width": 0.125}


@pytest.fixture(scope="module")
def encoded() -> tuple[bytes, variant_spec.VariantSpec]:
    spec = spec_for("vgg11", KWARGS, accuracy=0.75)
    return variant.encode(models.build("vgg11", KWARGS), spec), spec


def test_every_prefix_gives_the_spec_exactly_once_it_holds_the_whole_header(encoded):
    data, spec = encoded
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for length in range(header_end):
        assert header_spec(data[:length]) is None, length
    for length in (header_end, header_end + 1, header_end + 4096, len(data) // 2, len(data)):
        assert header_spec(data[:length]) == spec
    assert header_spec(bytearray(data[:header_end])) == spec
    assert variant.decode(data)[0] == spec  # the torch reader sees the same spec


def _header(metadata: object) -> bytes:
    body = json.dumps({"__metadata__": metadata}).encode()
    return struct.pack("<Q", len(body)) + body


@pytest.mark.parametrize(
    ("prefix", "refused"),
    [
        (struct.pack("<Q", variant_spec.MAX_HEADER_BYTES + 1), "beyond the 16777216-byte limit"),  # known at 8 bytes
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "no metadata"),
        (_header({"format": "other/1", "spec": "{}"}), "format is 'other/1'"),
        (_header({"format": variant_spec.FORMAT, "spec": 7}), "must be a JSON string"),
        (_header({"format": variant_spec.FORMAT, "spec": '{"arch": "vgg11"}'}), "spec is malformed"),
    ],
)
def test_malformed_headers_are_refused_from_the_prefix(prefix, refused):
    with pytest.raises(VariantError, match=refused):
        header_spec(prefix)


def test_the_spec_knows_its_precision(encoded):
    _, spec = encoded
    assert spec.precision == "float32"
    int8 = variant_spec.VariantSpec.from_json(json.dumps(json.loads(spec.to_json()) | {"extra": {"precision": "int8"}}))
    assert int8.precision == "int8"
    with pytest.raises(VariantError, match="extra must be an object"):
        variant_spec.VariantSpec.from_json(json.dumps(json.loads(spec.to_json()) | {"extra": [1]}))


def _props(held: variant_spec.VariantSpec, **changes: str | None) -> dict[str, str]:
    props = {"format": onnx_format.FORMAT, "spec": held.to_json(), "variant": "a" * 64, "precision": "float32"}
    return {k: v for k, v in (props | changes).items() if v is not None}


def test_onnx_metadata_is_read_and_checked(encoded):
    _, spec = encoded
    described = onnx_format.described(_props(spec))
    assert (described.spec, described.precision, described.variant, described.parent) == (
        spec,
        "float32",
        "a" * 64,
        None,
    )
    int8_spec = variant_spec.VariantSpec.from_json(
        json.dumps(json.loads(spec.to_json()) | {"extra": {"precision": "int8"}})
    )
    int8 = onnx_format.described(_props(int8_spec, precision="int8", parent="b" * 64))
    assert (int8.precision, int8.parent) == ("int8", "b" * 64)
    for changes, refused in [
        ({"format": "prunefleet.onnx/0"}, "format"),
        ({"precision": "int4"}, "precision"),
        ({"variant": None}, "names no variant"),
        ({"parent": "b" * 64}, "only one, names its float32 parent"),
        ({"spec": "{}"}, "spec is malformed"),
        ({"precision": "int8", "parent": "b" * 64}, "the spec says 'float32', the file 'int8'"),
    ]:
        with pytest.raises(onnx_format.OnnxFormatError, match=refused):
            onnx_format.described(_props(spec, **changes))


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from pathlib import Path
from common import onnx_format, variant_spec
print(variant_spec.header_spec(Path(sys.argv[1]).read_bytes()).input_shape, onnx_format.FORMAT)
"""


def test_the_formats_need_no_torch(encoded, tmp_path):
    data, _ = encoded
    (tmp_path / "v.safetensors").write_bytes(data)
    shown = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(tmp_path / "v.safetensors")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert shown.stdout.split() == ["(3,", "32,", "32)", "prunefleet.onnx/1"]
