"""A variant as ONNX: the second artifact of a variant, served by ONNX Runtime on edges without torch.

`export` turns a compact variant (as `common.variant.load` gives it) into one self-contained ONNX file:
opset 20, float32, one input `input` [batch, C, H, W] (normalized pixels, as the torch model takes
them) and one output `logits` [batch, classes], the batch dimension dynamic. The file describes itself
like the safetensors file: its `metadata_props` hold the format, the variant's spec (the same JSON
`VariantSpec.to_json()` gives), the id of the safetensors variant it came from and its precision
(`common.onnx_format`, which the edge reads too); ONNX Runtime reads them back without the `onnx` package
(`session.get_modelmeta().custom_metadata_map`).

Choices, each measured on a trained VGG-11 at width 0.5 (Fashion-MNIST):

- The exporter is TorchScript's (`dynamo=False`). Both exporters give the same graph for the zoo
  (Conv, Relu, MaxPool, flatten, Gemm) and both fold BatchNorm; the torch.export-based one took 2 to
  9 s a model against 0.15 to 0.8 s (on a busy machine), and it writes each node's Python stack trace
  (absolute file paths of the building machine), its FX node and the export's graph signature into
  the file, so its bytes would depend on where the build ran until those were stripped. The
  TorchScript exporter is deprecated; `check` and the determinism test say at once if a later torch
  exports anything else.
- BatchNorm is folded at export, by the exporter's own eval-mode fusion, rather than before export
  (`common.inference`'s fold) or left to ONNX Runtime: all three give the same graph after ORT's
  optimizations, the same batch-1 latency within quartiles (0.275, 0.281 and 0.285 ms) and the same
  max abs diff to the torch model (5.7e-6 on 2000 test images); a file without BatchNorm nodes is
  what quantization needs (a BatchNorm between QDQ pairs would stay float) and what an edge loads
  fastest. Left unoptimized, ORT ran the file 2.5-3x slower: sessions always optimize.
- The same model and spec give the same bytes in every process (content addressing depends on it):
  node and tensor names come from module paths, metadata is written in sorted order, and the
  protobuf is serialized deterministically.

`check` compares ONNX Runtime's outputs with the torch model's on real and random inputs before the
file is published, as surgery's equivalence check does for the compact model.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from torch import nn

from common.errors import PrunefleetError
from common.files import is_sha256_hex, short_id
from common.onnx_format import (  # noqa: F401  (the shared format, named here for the build's modules)
    FLOAT32,
    FORMAT,
    INPUT,
    INT8,
    MAX_ONNX_BYTES,
    METADATA_KEYS,
    OUTPUT,
)
from common.variant_spec import VariantSpec

OPSET = 20  # the newest the TorchScript exporter writes; ONNX Runtime 1.32 runs up to 23
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear, which int8 variants need
CHECK_CHUNK = 256  # inputs per forward pass of the check, so its scratch stays small


class ExportError(PrunefleetError, RuntimeError):
    """A variant whose ONNX file cannot be made, or differs from the torch model it came from."""


@dataclass(frozen=True)
class ExportConfig:
    """How a variant is exported and checked: the opset, the check's tolerance (surgery's own: max
    abs diff 1e-4 and the same argmax on every input), the random inputs it adds to the caller's, and
    ONNX Runtime's threads in the check."""

    opset: int = OPSET
    atol: float = 1e-4
    random_inputs: int = 32
    threads: int = 1

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= OPSET:
            raise ValueError(f"opset must be in [{MIN_OPSET}, {OPSET}], got {self.opset}")
        if not (math.isfinite(self.atol) and self.atol > 0):
            raise ValueError(f"atol must be a positive number, got {self.atol}")
        if self.random_inputs < 0:
            raise ValueError(f"random_inputs must be >= 0, got {self.random_inputs}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class CheckReport:
    """What the check compared: how many inputs, and the largest absolute difference of a logit."""

    inputs: int
    max_abs_diff: float


def export(model: nn.Module, spec: VariantSpec, variant_id: str, config: ExportConfig = ExportConfig()) -> bytes:
    """The ONNX file of `model` (put in eval mode), the compact model of the variant file `variant_id`
    with spec `spec`; checked by the ONNX checker, not yet against the model (`check`)."""
    if not is_sha256_hex(variant_id):
        raise ValueError(f"variant_id must be 64 lowercase hex digits, got {variant_id!r}")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the exporter's deprecation notices: it is chosen knowingly (above)
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            _torchscript_export(model.eval(), spec, buffer, config)
        proto = onnx.load_from_string(buffer.getvalue())
    except (RuntimeError, ValueError, TypeError, torch.onnx.OnnxExporterError) as err:
        raise ExportError(f"{spec.name or spec.arch} ({short_id(variant_id)}) does not export to ONNX: {err}") from err
    metadata = {"format": FORMAT, "spec": spec.to_json(), "variant": variant_id, "precision": FLOAT32}
    return finish(proto, metadata)


def _torchscript_export(model: nn.Module, spec: VariantSpec, buffer: io.BytesIO, config: ExportConfig) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, *spec.input_shape),),
        buffer,
        dynamo=False,
        opset_version=config.opset,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        training=torch.onnx.TrainingMode.EVAL,  # BatchNorm folded into the convolutions (module docstring)
        do_constant_folding=True,
    )


def finish(proto: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    """`proto` with exactly `metadata` as its metadata_props (in sorted order), validated by the ONNX
    checker and serialized deterministically."""
    del proto.metadata_props[:]
    for key in sorted(metadata):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, metadata[key]
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"the ONNX file of {describe(metadata)} is not valid: {err}") from err
    data = proto.SerializeToString(deterministic=True)
    if len(data) > MAX_ONNX_BYTES:
        raise ExportError(f"the ONNX file of {describe(metadata)} is {len(data)} bytes, over {MAX_ONNX_BYTES}")
    return data


def metadata(onnx_bytes: bytes) -> dict[str, str]:
    """The metadata_props of an ONNX file, checked to be a prunefleet one (`FORMAT`)."""
    if len(onnx_bytes) > MAX_ONNX_BYTES:
        raise ExportError(f"ONNX file is {len(onnx_bytes)} bytes, over {MAX_ONNX_BYTES}")
    try:
        proto = onnx.load_from_string(onnx_bytes)
    except DecodeError as err:
        raise ExportError(f"not an ONNX file: {err}") from err
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != FORMAT:
        raise ExportError(f"ONNX file format is {props.get('format')!r}, expected {FORMAT!r}")
    return props


def spec_of(onnx_bytes: bytes) -> VariantSpec:
    """The variant spec an ONNX file carries."""
    return VariantSpec.from_json(metadata(onnx_bytes)["spec"])


def describe(props: dict[str, str]) -> str:
    """How people know the variant an ONNX file holds: its name, precision and source variant's id."""
    try:
        name = VariantSpec.from_json(props["spec"]).name
    except (KeyError, ValueError):
        name = ""
    precision = props.get("precision", "?")
    return f"{name or 'variant'} {precision} ({short_id(props.get('variant', ''))})"


def session(onnx_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU as an edge makes it: all graph optimizations, sequential."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the build shares its CPUs
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def outputs(runner: ort.InferenceSession, inputs: torch.Tensor) -> np.ndarray:
    """Logits of an ONNX session on normalized float32 inputs, `CHECK_CHUNK` at a time."""
    parts = [runner.run([OUTPUT], {INPUT: chunk.numpy()})[0] for chunk in inputs.split(CHECK_CHUNK)]
    return np.concatenate(parts)


def check(
    onnx_bytes: bytes, model: nn.Module, inputs: torch.Tensor, config: ExportConfig = ExportConfig()
) -> CheckReport:
    """ONNX Runtime's logits against the torch model's on `inputs` (normalized float32 [N, C, H, W]:
    the build passes real test images) and `config.random_inputs` seeded random ones of the same shape:
    the largest absolute difference must be at most `config.atol` and no input may change its argmax,
    else ExportError naming the variant, the difference and how many inputs disagree."""
    props = metadata(onnx_bytes)
    if props.get("precision") != FLOAT32:
        raise ExportError(f"{describe(props)}: only float32 files are checked against torch; int8 is measured")
    if inputs.dim() != 4 or not inputs.is_floating_point():
        raise ValueError(f"check inputs must be float [N, C, H, W], got {inputs.dtype} {tuple(inputs.shape)}")
    noise = torch.randn(config.random_inputs, *inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    x = torch.cat([inputs.to(torch.float32), noise]).contiguous()
    if len(x) == 0:
        raise ValueError("the check needs at least one input")
    with torch.inference_mode():
        want = torch.cat([model.eval()(chunk) for chunk in x.split(CHECK_CHUNK)]).numpy()
    got = outputs(session(onnx_bytes, config.threads), x)
    if got.shape != want.shape:
        raise ExportError(f"{describe(props)}: ONNX gives logits {got.shape}, torch {want.shape}")
    diff, disagree = float(np.abs(got - want).max()), int((got.argmax(1) != want.argmax(1)).sum())
    if not diff <= config.atol or disagree:
        raise ExportError(
            f"{describe(props)}: ONNX Runtime differs from the torch model: max abs diff {diff:.3g} "
            f"(limit {config.atol:g}), argmax differs on {disagree} of {len(x)} inputs"
        )
    return CheckReport(len(x), diff)
