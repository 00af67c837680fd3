"""The streaming safetensors reader: same tensors and hash as the library, strict about malformed files."""

import json
import struct

import pytest
import torch
from safetensors.torch import save

from common import tensorfile
from common.files import sha256_bytes

TENSORS = {
    "a": torch.randn(3, 4),
    "b": torch.arange(5, dtype=torch.int64),
    "c": torch.zeros(0, 2),
    "d": torch.tensor([True, False]),
    "e": torch.randn(2, 2).to(torch.bfloat16),
}


def _write(tmp_path, data: bytes):
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    return path


def test_reads_what_safetensors_wrote_and_hashes_the_whole_file(tmp_path):
    data = save(TENSORS, metadata={"format": "x"})
    metadata, tensors, sha = tensorfile.read(_write(tmp_path, data), 1 << 20)
    assert metadata == {"format": "x"} and sha == sha256_bytes(data) and set(tensors) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor)


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "header describes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "header describes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), "its shape needs"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "gap or overlap"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            bytes(4),
            "gap or overlap",
        ),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4), "shape"),
        ({"__metadata__": {"k": 1}}, b"", "metadata"),
    ],
    ids=["short", "trailing", "span", "gap", "overlap", "dtype", "negative", "metadata"],
)
def test_malformed_files_are_refused_naming_the_problem(tmp_path, header, data, needle):
    with pytest.raises(tensorfile.TensorFileError, match=needle):
        tensorfile.read(_write(tmp_path, _with_header(header, data)), 1 << 20)


def test_an_oversized_header_is_refused_before_it_is_read(tmp_path):
    path = _write(tmp_path, struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(tensorfile.TensorFileError, match="beyond the file or the limit"):
        tensorfile.read(path, 1 << 20)
