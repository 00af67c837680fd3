"""Variant files wrong in one known way each, made from a good one by editing its bytes.

A safetensors file is an 8-byte header length, a JSON header (each tensor's dtype, shape and byte
offsets, and the `__metadata__` holding the format and the JSON `spec`) and the tensor bytes. The
edits here change one part and leave the rest as the good file has it, so each file tests one check of
the loading paths: `header_cases` the container, `spec_cases` the spec (allow-list, sizes, numbers),
`tensor_cases` the tensors against the architecture the spec names. Each case is (what is wrong, file
bytes, words one of which the refusal must hold); `bench.fuzz.files` runs them.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

NOT_IMPORTED = "wave:open"  # a stdlib module nothing here imports: a load must not import it either


def split(data: bytes) -> tuple[dict, bytes]:
    """A file's JSON header, parsed, and the tensor bytes after it."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict | str | bytes, body: bytes) -> bytes:
    """A file from a header (a dict, or raw text for headers no JSON writer makes) and tensor bytes."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def with_spec(good: bytes, **changes) -> bytes:
    header, body = split(good)
    spec = json.loads(header["__metadata__"]["spec"])
    spec.update(changes)
    header["__metadata__"]["spec"] = json.dumps(spec)
    return join(header, body)


def with_tensors(good: bytes, change) -> bytes:
    """The file with its tensors changed by `change(dict)` and the same metadata."""
    header, _ = split(good)
    tensors = dict(load_tensors(good))
    change(tensors)
    return save_tensors(tensors, metadata=header["__metadata__"])


def with_entry(good: bytes, name: str, **changes) -> bytes:
    header, body = split(good)
    header[name].update(changes)
    return join(header, body)


def header_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
    header, body = split(good)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return [
        ("empty file", b"", ("shorter", "ends")),
        ("length cut short", b"\x10\x00", ("shorter", "ends")),
        ("header beyond the file", struct.pack("<Q", 1 << 20) + b"{}", ("beyond",)),
        ("header length 2^63", struct.pack("<Q", 1 << 63) + b"{}", ("beyond",)),
        ("header not JSON", join(b"\xff\xfe{{", body), ("not json",)),
        ("header nested 100000 deep", join(b"[" * 100_000, body), ("not json",)),
        ("header with a 5000-digit number", join(b'{"a": ' + b"1" * 5000 + b"}", body), ("not json",)),
        ("header is a list", join("[]", body), ("not a json object", "metadata")),
        ("no metadata", join({k: v for k, v in header.items() if k != "__metadata__"}, body), ("format", "metadata")),
        ("metadata not strings", join({**header, "__metadata__": {"format": 1}}, body), ("metadata", "format")),
        ("truncated", good[:-100], ("file holds", "ends", "unreadable")),
        ("trailing bytes", good + b"\x00" * 8, ("file holds", "unreadable")),
        (
            "declared size beyond the file",
            with_entry(good, last, data_offsets=[header[last]["data_offsets"][0], header[last]["data_offsets"][1] + 4]),
            ("spans", "describes", "unreadable"),
        ),
        (
            "offsets overlap",
            with_entry(good, first, data_offsets=[4, header[first]["data_offsets"][1] + 4]),
            ("gap or overlap", "unreadable", "spans"),
        ),
        ("unknown dtype", with_entry(good, first, dtype="F8"), ("dtype", "f8")),
        ("negative shape", with_entry(good, first, shape=[-1]), ("shape", "-1")),
        (
            "wrong format",
            join({**header, "__metadata__": {**header["__metadata__"], "format": "pickle"}}, body),
            ("format",),
        ),
    ]


def spec_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
    header, body = split(good)
    kwargs = json.loads(header["__metadata__"]["spec"])["kwargs"]
    return [
        ("spec not JSON", join({**header, "__metadata__": {**header["__metadata__"], "spec": "{"}}, body), ("spec",)),
        (
            "spec nested 100000 deep",
            join({**header, "__metadata__": {**header["__metadata__"], "spec": "[" * 100_000}}, body),
            ("spec",),
        ),
        ("spec missing num_classes", with_spec(good, num_classes=None), ("num_classes", "spec")),
        ("arch not in the zoo", with_spec(good, arch="resnet9000"), ("allow-list",)),
        ("arch an import path outside the allow-list", with_spec(good, arch=NOT_IMPORTED), ("not allowed",)),
        ("arch a path", with_spec(good, arch="../x"), ("allow-list",)),
        ("arch not a string", with_spec(good, arch=5), ("allow-list",)),
        ("kwargs not a mapping", with_spec(good, kwargs=5), ("cannot build",)),
        ("width infinite", _raw_spec(good, '"width": 0.125', '"width": 1e400'), ("cannot build",)),
        ("width 10^12", with_spec(good, kwargs={**kwargs, "width": 1e12}), ("cannot build",)),
        ("input_shape 100000x100000", with_spec(good, input_shape=[1, 100_000, 100_000]), ("input_shape",)),
        ("std NaN", _raw_spec(good, '"std": [0.25]', '"std": [NaN]'), ("std",)),
        ("std zero", with_spec(good, std=[0.0]), ("std",)),
        ("mean infinite", _raw_spec(good, '"mean": [0.5]', '"mean": [Infinity]'), ("mean",)),
        ("sparsity 2", with_spec(good, sparsity=2.0), ("sparsity",)),
    ]


def _raw_spec(good: bytes, old: str, new: str) -> bytes:
    """The spec's JSON text edited as text (for values JSON writers refuse: NaN, 1e400)."""
    header, body = split(good)
    spec = header["__metadata__"]["spec"]
    if old not in spec:
        raise ValueError(f"{old!r} is not in the spec {spec}")
    header["__metadata__"]["spec"] = spec.replace(old, new)
    return join(header, body)


def tensor_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
    def drop(t):
        del t["classifier.bias"]

    def scalar_batchnorm(t):
        t["features.1.running_mean"] = torch.tensor(0.0)

    def flat_linear(t):
        t["classifier.weight"] = t["classifier.weight"].flatten()

    def flat_conv(t):
        t["features.0.weight"] = t["features.0.weight"].flatten(1)

    def integer_weight(t):
        t["features.0.weight"] = t["features.0.weight"].to(torch.int32)

    def extra(t):
        t["evil.weight"] = torch.zeros(2)

    def narrower(t):
        t["features.0.weight"] = t["features.0.weight"][:2]  # its readers still expect every channel

    def transposed(t):
        t["classifier.weight"] = t["classifier.weight"].t().contiguous()

    changes = [
        ("a tensor missing", drop, ("no values", "missing")),
        ("batchnorm statistics a scalar", scalar_batchnorm, ("shape", "fit", "match")),
        ("linear weight 1-D", flat_linear, ("shape", "fit", "match")),
        ("conv weight 2-D", flat_conv, ("shape", "fit", "match")),
        ("integer weight", integer_weight, ("floating",)),
        ("a tensor with no place", extra, ("no place",)),
        ("shapes that do not match", narrower, ("shape", "fit", "match")),
        ("linear weight transposed", transposed, ("shape", "fit", "match", "outputs")),
    ]
    return [(name, with_tensors(good, change), expect) for name, change, expect in changes]
