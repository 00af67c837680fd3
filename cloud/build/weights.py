"""Trained weights a build starts from (`portfolio build --weights FILE`), read from a local file.

Three forms are accepted, told apart by their bytes, not their names:

- a `.safetensors` file of the model's state dict (any metadata);
- a variant file (`prunefleet.variant/1`, `common.variant`) whose spec names the build's architecture
  and constructor arguments, and whose layers are at full width (an uncompacted level);
- a torch checkpoint read with `torch.load(weights_only=True)`: the state dict itself, or a dict
  holding it under `state_dict` or `model` (other entries, such as an optimizer's, are ignored).

Keys written through a wrapper (`module.` of DistributedDataParallel, `_orig_mod.` of `torch.compile`)
lose that prefix. Every value must be a tensor, floating point ones finite, and the file at most
`MAX_WEIGHTS_BYTES`. `load_into` then fits the state to a model strictly: a mismatch names the missing,
unexpected and mis-shaped keys, a few of each with their counts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common import tensorfile, variant
from common.errors import PrunefleetError
from common.files import sha256_file

MAX_WEIGHTS_BYTES = 1 << 30  # 1 GiB
MAX_HEADER_BYTES = variant.MAX_HEADER_BYTES
SHOWN = 3  # keys named per kind of mismatch
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CONTAINER_KEYS = ("state_dict", "model")


class WeightsError(PrunefleetError, ValueError):
    """Weights a build cannot start from; the message names the file, the keys or the limit."""


@dataclass(frozen=True)
class Weights:
    """A state dict read from a file, and the spec when the file is a variant."""

    state: dict[str, torch.Tensor]
    form: str  # "safetensors", "variant" or "torch"
    spec: variant.VariantSpec | None = None


def check_file(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> int:
    """The size of a regular file within the bound; raises WeightsError otherwise."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise WeightsError(f"weights file {path} cannot be read: {err.strerror or err}") from None
    if not path.is_file():
        raise WeightsError(f"weights file {path} is not a regular file")
    if info.st_size > max_bytes:
        raise WeightsError(f"weights file {path.name} is {info.st_size} bytes, over the limit of {max_bytes} bytes")
    return info.st_size


def fingerprint(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> str:
    """The sha256 (hex) of a weights file: what a build records of it, so the same weights resume a
    build wherever they are, and other weights do not."""
    check_file(path, max_bytes)
    return sha256_file(Path(path))


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length within the file, then the header's opening brace."""
    return len(head) >= 9 and 8 + int.from_bytes(head[:8], "little") <= size and head[8:9] == b"{"


def _read_safetensors(path: Path) -> Weights:
    try:
        metadata, tensors, _ = tensorfile.read(path, MAX_HEADER_BYTES)
    except tensorfile.TensorFileError as err:
        raise WeightsError(f"{path.name} is not a well-formed safetensors file: {err}") from None
    if metadata.get("format") != variant.FORMAT:
        return Weights(tensors, "safetensors")
    try:
        spec = variant.VariantSpec.from_json(metadata.get("spec", ""))
    except variant.VariantError as err:
        raise WeightsError(f"{path.name} is a variant file with a malformed spec: {err}") from None
    return Weights(tensors, "variant", spec)


def _read_torch(path: Path, size: int) -> Weights:
    """A torch checkpoint through the weights-only unpickler (no code runs, only tensors and plain
    containers come back), from the file whose size was checked."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise WeightsError(f"weights file {path.name} changed while it was read")
        try:
            loaded = torch.load(f, weights_only=True, map_location="cpu")
        except OSError:
            raise
        except Exception as err:  # the unpickler's failures on foreign bytes take many types
            raise WeightsError(
                f"{path.name} is neither a safetensors file, a variant file nor a torch checkpoint of "
                f"tensors ({_reason(err)})"
            ) from None
    return Weights(_state_dict(loaded, path.name), "torch")


def _reason(err: Exception) -> str:
    """What a torch.load failure says was wrong (not how to load the file unsafely)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = " ".join(text.split()).split(" was not an allowed global")[0]
    elif text.startswith("Weights only load failed"):
        text = "the weights-only reader refused it"
    lines = text.strip().splitlines()
    return lines[0][:200] if lines and not isinstance(err, KeyError) else type(err).__name__


def _state_dict(loaded: object, name: str) -> dict:
    """The state dict inside a loaded checkpoint: itself, or under one of `_CONTAINER_KEYS`."""
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{name} holds a {type(loaded).__name__}, not a state dict")
    for key in _CONTAINER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return dict(loaded[key])
    return dict(loaded)


def _unwrapped(state: dict, name: str) -> dict[str, torch.Tensor]:
    """Wrapper prefixes removed (when every key has one), and every value checked to be a tensor
    (finite when floating point)."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    if not state:
        raise WeightsError(f"{name} holds no tensors")
    odd = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        shown = ", ".join(f"{str(k)[:60]!r} ({type(state[k]).__name__})" for k in odd[:SHOWN])
        raise WeightsError(f"{name}: {len(odd)} entries are not named tensors: {shown}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{name}: {len(bad)} tensors hold NaN or infinite values: {', '.join(bad[:SHOWN])}")
    return state


def read(path: Path, max_bytes: int = MAX_WEIGHTS_BYTES) -> Weights:
    """The state dict of a weights file in any of the accepted forms; raises WeightsError for a file
    too large, of another form, or holding anything but tensors."""
    path = Path(path)
    size = check_file(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(9)
    found = _read_safetensors(path) if _looks_like_safetensors(head, size) else _read_torch(path, size)
    return Weights(_unwrapped(found.state, path.name), found.form, found.spec)


def check_variant(weights: Weights, arch: str, kwargs: dict) -> None:
    """A variant file must be of the build's architecture with the same constructor arguments."""
    spec = weights.spec
    if spec is None:
        return
    if spec.arch != arch or spec.kwargs != kwargs:
        raise WeightsError(
            f"the weights are a variant of {spec.arch} with {spec.kwargs}; this build is {arch} with {kwargs}"
        )


def fit(model: nn.Module, weights: Weights, arch: str, kwargs: dict) -> None:
    """`check_variant`, then `load_into`; a variant that does not fit is named as one (compacted
    layers are narrower than the architecture, so only an uncompacted level can start a build)."""
    check_variant(weights, arch, kwargs)
    try:
        load_into(model, weights.state)
    except WeightsError as err:
        if weights.form != "variant":
            raise
        raise WeightsError(f"{err}; a variant starts a build only with every layer at full width") from None


def _listed(kind: str, names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:SHOWN])}{more})"


def _mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from fitting `expected`, one phrase per kind; empty when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k}: {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    kinds = [
        f"{k}: {state[k].dtype} in the file, {expected[k].dtype} in the model"
        for k in expected
        if k in state and expected[k].is_floating_point() != state[k].is_floating_point()
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped), ("of another kind", kinds))
    return [_listed(kind, names) for kind, names in found if names]


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `model`, strictly: every key of the model, nothing else, each of its shape.
    Raises WeightsError naming the missing, unexpected and mis-shaped keys (a few of each, counted)."""
    expected = model.state_dict()
    problems = _mismatch(expected, state)
    if problems:
        raise WeightsError(
            f"the weights do not fit {type(model).__name__} ({len(expected)} tensors): {'; '.join(problems)}. "
            "Check --model, --width and the dataset (input channels, size and classes) against the weights"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
