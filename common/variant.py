"""The variant file: one `.safetensors` file, pickle-free, whose sha256 is its identity.

Header metadata holds `format` = `prunefleet.variant/1` and a JSON `spec` (`common.variant_spec`, which
reads and checks specs and headers without torch; re-exported here). Shapes come from the
tensors: a reader builds the base architecture and shrinks every layer to the stored shapes, so
rebuilding a compact model needs neither torch-pruning nor the pruning history. A depthwise conv
(groups == in == out channels in the base) stays depthwise at its stored channel count.

The spec's `arch` is a zoo name, `torchvision:NAME` or an import path (`package.module:function`).
Readers pass `allowed_models`, the import paths this process may build (zoo and torchvision names
always may; by default none), and `decode` refuses any other path before anything is built or imported.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from common import layer_shapes, models, tensorfile
from common.files import atomic_write_bytes, sha256_bytes
from common.registry import UnknownNameError
from common.variant_spec import (  # noqa: F401  (re-exported: what callers import from here)
    FORMAT,
    MAX_CLASS_NAME_CHARS,
    MAX_CLASSES,
    MAX_HEADER_BYTES,
    MAX_INPUT_VALUES,
    MAX_VARIANT_BYTES,
    VariantError,
    VariantSpec,
    header_metadata,
    header_spec,
    metadata_spec,
)
from common.vision_models import VisionUnavailableError


@dataclass(frozen=True)
class Variant:
    spec: VariantSpec
    model: nn.Module
    sha256: str
    size_bytes: int


def encode(model: nn.Module, spec: VariantSpec) -> bytes:
    """Serialize a (compact) model and its spec to variant-file bytes. The same model and spec give
    the same bytes, hence the same id, in every process: the header is rewritten with sorted keys
    (safetensors writes its metadata map in an order that changes from process to process)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    data = save_tensors(tensors, metadata={"format": FORMAT, "spec": spec.to_json()})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors keeps the data section 8-byte aligned
    return struct.pack("<Q", len(header)) + header + data[8 + length :]


def save(model: nn.Module, spec: VariantSpec, path: Path) -> str:
    """Write a variant file atomically; returns its sha256."""
    data = encode(model, spec)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The header metadata of a whole variant file (`header_metadata`, which also reads prefixes)."""
    if len(data) < 8:
        raise VariantError("variant file is shorter than its 8-byte header length")
    metadata = header_metadata(data)
    if metadata is None:
        (header_len,) = struct.unpack("<Q", data[:8])
        raise VariantError(f"variant header declares {header_len} bytes, beyond the file")
    return metadata


def _spec(metadata: dict[str, str], allowed_models: Collection[str]) -> VariantSpec:
    """The spec a header holds, once its format and architecture are accepted."""
    spec = metadata_spec(metadata)
    try:
        models.check_allowed(spec.arch, allowed_models)
    except (UnknownNameError, ValueError) as err:
        raise VariantError(f"architecture {spec.arch!r} is not on the allow-list: {err}") from None
    return spec


def decode(
    data: bytes, expected_sha256: str | None = None, *, allowed_models: Collection[str] = ()
) -> tuple[VariantSpec, dict[str, torch.Tensor]]:
    """Check and parse variant-file bytes. Nothing is built, imported or unpickled; an `arch` that is
    neither a zoo name nor an import path in `allowed_models` is refused."""
    if len(data) > MAX_VARIANT_BYTES:
        raise VariantError(f"variant file is {len(data)} bytes, over the {MAX_VARIANT_BYTES}-byte limit")
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise VariantError(f"variant file sha256 does not match {expected_sha256}")
    spec = _spec(_header_metadata(data), allowed_models)
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as err:
        raise VariantError(f"variant tensors are unreadable: {err}") from err
    return spec, tensors


def _resize_tensor(module: nn.Module, attr: str, shape: torch.Size, dtype: torch.dtype) -> None:
    blank = torch.empty(shape, dtype=dtype, device="meta")
    if attr in module._parameters:
        setattr(module, attr, nn.Parameter(blank, requires_grad=module._parameters[attr].requires_grad))
    else:
        module._buffers[attr] = blank


def _sync_conv(name: str, conv: nn.Conv2d) -> None:
    """Conv attributes from the (resized) weight. A depthwise conv in the base (groups == in == out
    channels, groups > 1) stays depthwise: its stored weight must be [C, 1, k, k], and groups, in and
    out channels all become C. Any other conv keeps its groups, which must divide the stored shape."""
    out_channels, in_per_group = conv.weight.shape[:2]
    if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
        if in_per_group != 1:
            raise VariantError(
                f"depthwise conv {name!r} must store [C, 1, k, k] weights, got {list(conv.weight.shape)}"
            )
        conv.groups = out_channels
    elif out_channels % conv.groups:
        raise VariantError(f"conv {name!r} has {conv.groups} groups, which do not divide {out_channels} filters")
    conv.out_channels = out_channels
    conv.in_channels = in_per_group * conv.groups


def _sync_shape_attributes(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        _sync_conv(name, module)
    else:
        layer_shapes.sync(name, module)  # linear layers and norms


def _base_model(spec: VariantSpec, allowed_models: Collection[str]) -> nn.Module:
    """The base architecture on the meta device: shapes only, no memory (a compact variant never
    allocates its full-size base). A torchvision architecture where torchvision is missing is refused
    with how to install it."""
    try:
        with torch.device("meta"):
            return models.build(spec.arch, spec.kwargs, allowed=allowed_models)
    except VisionUnavailableError as err:
        raise VariantError(str(err)) from err
    except (UnknownNameError, ValueError, TypeError, RuntimeError, ArithmeticError) as err:
        raise VariantError(f"cannot build {spec.arch!r} with {spec.kwargs}: {err}") from err


def build_model(
    spec: VariantSpec, tensors: dict[str, torch.Tensor], *, allowed_models: Collection[str] = (), check: bool = True
) -> nn.Module:
    """Build the base architecture (on the meta device), shrink each layer to the stored shapes and
    take the stored tensors as its weights (no copy). `allowed_models` as in `decode`. A forward pass
    at batch 1 checks that the layers fit together; `check=False` skips it, only for tensors whose
    identical copy (same sha256) passed it in this process: the pass's scratch for activations can be
    more than the smallest variants hold."""
    model = _base_model(spec, allowed_models)
    modules = dict(model.named_modules())
    for key, value in tensors.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None or (attr not in module._parameters and attr not in module._buffers):
            raise VariantError(f"tensor {key!r} has no place in {spec.arch}")
        if attr in module._parameters and not value.is_floating_point():
            raise VariantError(f"tensor {key!r} is {value.dtype}; parameters must be floating point")
        declared = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if declared is not None and value.dtype != declared.dtype:
            raise VariantError(f"tensor {key!r} is {value.dtype}; {spec.arch} declares {declared.dtype}")
        _resize_tensor(module, attr, value.shape, value.dtype)
    for name, module in model.named_modules():
        try:
            _sync_shape_attributes(name, module)
        except (IndexError, TypeError, ValueError) as err:
            if isinstance(err, VariantError):
                raise
            raise VariantError(f"variant tensor shapes do not fit layer {name!r}: {err}") from err
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        raise VariantError(f"variant tensors do not match {spec.arch}: {err}") from err
    missing = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing:
        raise VariantError(f"variant file has no values for {', '.join(missing[:5])}")
    model.eval()
    if not check:
        return model
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *spec.input_shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise VariantError(f"variant layer shapes do not fit together: {err}") from err
    if tuple(out.shape) != (1, spec.num_classes):
        raise VariantError(f"variant outputs {tuple(out.shape)}, expected (1, {spec.num_classes})")
    return model


def load_bytes(data: bytes, expected_sha256: str | None = None, *, allowed_models: Collection[str] = ()) -> Variant:
    spec, tensors = decode(data, expected_sha256, allowed_models=allowed_models)
    return Variant(spec, build_model(spec, tensors, allowed_models=allowed_models), sha256_bytes(data), len(data))


def load(
    path: Path, expected_sha256: str | None = None, *, allowed_models: Collection[str] = (), check: bool = True
) -> Variant:
    """Read, verify and rebuild a variant file; `allowed_models` as in `decode`, `check` as in
    `build_model` (False needs `expected_sha256`). The tensors are read straight into place
    (`common.tensorfile`), so loading holds the variant once, not twice."""
    if not check and expected_sha256 is None:
        raise ValueError("only a file of a known sha256 may skip the check")
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_VARIANT_BYTES:
        raise VariantError(f"{path.name} is {size} bytes, over the {MAX_VARIANT_BYTES}-byte limit")
    try:
        metadata, tensors, sha256 = tensorfile.read(path, MAX_HEADER_BYTES)
    except tensorfile.TensorFileError as err:
        raise VariantError(f"{path.name} is unreadable: {err}") from err
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise VariantError(f"variant file sha256 does not match {expected_sha256}")
    spec = _spec(metadata, allowed_models)
    return Variant(spec, build_model(spec, tensors, allowed_models=allowed_models, check=check), sha256, size)
