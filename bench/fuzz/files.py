"""Malformed variant files through the edge's real loading paths (the *files* part of the fuzz).

crafted   one file per way a variant file can be wrong (`crafted_files`): header, spec, allow-list,
          tensors, sizes; each must be refused by `common.variant.load` and `load_bytes` with a
          `VariantError` whose message names the problem, `common.tensorfile.read` may raise only
          `TensorFileError`, and no file may be left behind
random    hypothesis: byte mutations of a good file, specs with wild JSON values, tensor entries
          with wild dtypes, shapes and offsets; anything but a `VariantError` (or a clean load of a
          usable variant) is a crash
ids       path-like variant ids (`../x`) at the fetcher: refused before any I/O
edge      a real cloud serving a portfolio of one good and several crafted files to a real edge
          (mutual TLS, signed listing): the edge serves the good one, refuses each crafted one by
          name, and its cache holds only files that hash to their names
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from common import tensorfile, variant
from common.files import sha256_bytes
from edge.fetcher import FetchError, fetch

PATH_IDS = ("../x", "../../etc/passwd", "/etc/passwd", "A" * 64, "0" * 63, "", "x/" + "0" * 62)
NOT_IMPORTED = "wave:open"  # a stdlib module nothing here imports: a load must not import it either


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join(header: dict | str | bytes, body: bytes) -> bytes:
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


def _header_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
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


def _spec_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
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


def _tensor_cases(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
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


def crafted_files(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
    """(what is wrong, file bytes, words one of which the error must hold)."""
    return _header_cases(good) + _spec_cases(good) + _tensor_cases(good)


def _usable(held: variant.Variant) -> str | None:
    spec = held.spec
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std)) or min(spec.std) <= 0:
        return "loaded a variant whose normalization is unusable"
    with torch.no_grad():
        out = held.model(torch.zeros(1, *spec.input_shape))
    return None if torch.isfinite(out).all() else "loaded a variant whose outputs are not finite"


def check_file(data: bytes, expect: tuple[str, ...] | None, folder: Path) -> str | None:
    """The problem with how the loading paths treat `data`, or None. `expect` None: the file may be
    fine (random mutations); otherwise it must be refused with a message holding one of the words."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "variant.safetensors"
    path.write_bytes(data)
    before, modules = sorted(folder.parent.rglob("*")), set(sys.modules)
    sha = sha256_bytes(data)
    for how, load in (
        ("load", lambda: variant.load(path, expected_sha256=sha)),
        ("load_bytes", lambda: variant.load_bytes(data, expected_sha256=sha)),
    ):
        try:
            held = load()
        except variant.VariantError as err:
            message = str(err).lower()
            if expect and not any(word in message for word in expect):
                return f"{how}: message names none of {expect}: {str(err)[:200]}"
            continue
        except Exception as err:
            return f"{how}: {type(err).__name__} escaped: {str(err)[:200]}"
        if expect:
            return f"{how}: loaded a malformed file"
        problem = _usable(held)
        if problem:
            return f"{how}: {problem}"
    try:
        tensorfile.read(path, variant.MAX_HEADER_BYTES)
    except tensorfile.TensorFileError:
        pass
    except Exception as err:
        return f"tensorfile.read: {type(err).__name__} escaped: {str(err)[:200]}"
    if sorted(folder.parent.rglob("*")) != before:
        return "loading left a file behind"
    if NOT_IMPORTED.split(":")[0] in set(sys.modules) - modules:
        return f"loading imported {NOT_IMPORTED}"
    path.unlink()
    return None


# --- hypothesis: random damage ------------------------------------------------------------------------
def json_values() -> st.SearchStrategy:
    leaves = st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def mutations(good: bytes) -> st.SearchStrategy[bytes]:
    """Bytes overwritten (mostly in the header), or the file cut short."""
    (length,) = struct.unpack("<Q", good[:8])

    def damage(edits: list[tuple[int, int]], cut: int | None) -> bytes:
        data = bytearray(good)
        for at, value in edits:
            data[at] = value
        return bytes(data[:cut] if cut is not None else data)

    positions = st.one_of(st.integers(0, 8 + length - 1), st.integers(0, len(good) - 1))
    return st.builds(
        damage, st.lists(st.tuples(positions, st.integers(0, 255)), max_size=6), st.none() | st.integers(0, len(good))
    )


def specs(good: bytes) -> st.SearchStrategy[bytes]:
    fields = ("arch", "kwargs", "input_shape", "num_classes", "mean", "std", "method", "sparsity", "accuracy")
    spec = json.loads(split(good)[0]["__metadata__"]["spec"])

    def build(changes: dict) -> bytes:
        header, body = split(good)
        header["__metadata__"]["spec"] = json.dumps({**spec, **changes})
        return join(header, body)

    return st.builds(build, st.dictionaries(st.sampled_from(fields), json_values(), min_size=1, max_size=3))


def entries(good: bytes) -> st.SearchStrategy[bytes]:
    header, _ = split(good)
    names = sorted(k for k in header if k != "__metadata__")
    wild = {
        "dtype": st.sampled_from(sorted(tensorfile.DTYPES)) | json_values(),
        "shape": json_values(),
        "data_offsets": json_values() | st.lists(st.integers(-(1 << 63), 1 << 64), max_size=3),
    }

    def build(name: str, changes: dict) -> bytes:
        return with_entry(good, name, **changes)

    return st.builds(build, st.sampled_from(names), st.fixed_dictionaries({}, optional=wild))


def fetcher_ids(folder: Path) -> list[tuple[str, str | None]]:
    """Path-like ids at the fetcher, each with the problem (None: refused before any I/O, naming the id's
    form; the stub is never called and nothing is made)."""

    class NoStub:
        def FetchVariant(self, request, timeout=None):
            raise AssertionError("the fetcher called the cloud with a bad id")

    results = []
    cache = folder / "cache"
    for vid in PATH_IDS:
        problem = None
        try:
            fetch(NoStub(), vid, cache)
            problem = f"fetcher took id {vid!r}"
        except FetchError as err:
            if "sha256" not in str(err):
                problem = f"fetcher refused {vid!r} without naming the problem: {err}"
        except Exception as err:
            problem = f"fetcher: {type(err).__name__} for id {vid!r}: {err}"
        if cache.exists() or any(p.name in ("x", "passwd") for p in folder.parent.rglob("*")):
            problem = f"fetcher made files for id {vid!r}"
        results.append((vid, problem))
    return results
