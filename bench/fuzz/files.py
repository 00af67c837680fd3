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

from bench.fuzz import crafted
from bench.fuzz.crafted import NOT_IMPORTED, join, split, with_entry
from common import tensorfile, variant
from common.files import sha256_bytes
from edge.fetcher import FetchError, fetch

PATH_IDS = ("../x", "../../etc/passwd", "/etc/passwd", "A" * 64, "0" * 63, "", "x/" + "0" * 62)


def crafted_files(good: bytes) -> list[tuple[str, bytes, tuple[str, ...]]]:
    """Every crafted case (`bench.fuzz.crafted`): (what is wrong, file bytes, words one of which the error
    must hold)."""
    return crafted.header_cases(good) + crafted.spec_cases(good) + crafted.tensor_cases(good)


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
