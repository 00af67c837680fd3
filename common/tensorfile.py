"""Read a safetensors file tensor by tensor, straight into each tensor's memory, hashing as it reads.

Loading a variant this way holds its tensors once: no buffer of the whole file beside them (a switch
that loads on demand then costs the incoming variant's bytes, not twice that). The header is checked
strictly before any tensor is read: a bounded size, known dtypes, non-negative shapes, and offsets
that tile the data section exactly (no gap, no overlap, nothing after it). The sha256 covers every
byte read, which is the whole file, so a caller compares it with the identity it expects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from common.errors import PrunefleetError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFileError(PrunefleetError, ValueError):
    """A file that is not a well-formed safetensors file; the message says where."""


def _exact(f, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise TensorFileError(f"file ends after {len(data)} of {size} bytes")
    return data


def _entry(name: str, raw) -> tuple[int, int, str, torch.dtype, tuple[int, ...]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("dtype"), str) or raw["dtype"] not in DTYPES:
        raise TensorFileError(f"tensor {name!r} has no known dtype")
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
        raise TensorFileError(f"tensor {name!r} has a malformed shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or any(not isinstance(o, int) for o in offsets):
        raise TensorFileError(f"tensor {name!r} has malformed data offsets {offsets!r}")
    dtype = DTYPES[raw["dtype"]]
    if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        raise TensorFileError(
            f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    return offsets[0], offsets[1], name, dtype, tuple(shape)


def _header(f, file_size: int, max_header_bytes: int, digest) -> tuple[dict, list]:
    prefix = _exact(f, 8)
    (length,) = struct.unpack("<Q", prefix)
    if length > max_header_bytes or 8 + length > file_size:
        raise TensorFileError(f"header declares {length} bytes, beyond the file or the limit")
    text = _exact(f, length)
    digest.update(prefix)
    digest.update(text)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:  # not UTF-8 or JSON, a number too long, nesting too deep
        raise TensorFileError(f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or any(not isinstance(v, str) for v in metadata.values()):
        raise TensorFileError("header metadata must map names to strings")
    entries = sorted(_entry(name, raw) for name, raw in header.items())
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise TensorFileError(f"tensor {name!r} starts at {begin}, expected {end} (gap or overlap)")
        end = stop
    if 8 + length + end != file_size:
        raise TensorFileError(f"file holds {file_size} bytes, its header describes {8 + length + end}")
    return metadata, entries


def read(path: Path, max_header_bytes: int) -> tuple[dict[str, str], dict[str, torch.Tensor], str]:
    """The header metadata, the tensors, and the sha256 (hex) of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        metadata, entries = _header(f, os.fstat(f.fileno()).st_size, max_header_bytes, digest)
        tensors = {}
        for begin, stop, name, dtype, shape in entries:
            buffer = torch.empty(stop - begin, dtype=torch.uint8)
            view, got = memoryview(buffer.numpy()), 0
            while got < len(view):
                count = f.readinto(view[got:])
                if not count:
                    raise TensorFileError(f"file ends inside tensor {name!r}")
                got += count
            digest.update(view)
            tensors[name] = buffer.view(dtype).reshape(shape)
    return metadata, tensors, digest.hexdigest()
