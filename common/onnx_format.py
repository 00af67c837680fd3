"""The ONNX artifact of a variant, as cloud and edge both read it: its format name, size bound, input
and output names, and the metadata keys that make the file describe itself. No torch and no `onnx`
package: the cloud writes these files (`cloud.build.onnx_export`, `cloud.build.quantize`), an edge
serves them with ONNX Runtime alone (`edge.ort_model`).

A prunefleet ONNX file's `metadata_props` hold:

- `format`: `FORMAT`;
- `spec`: the variant's spec as JSON (`common.variant_spec.VariantSpec`), whose `extra.precision` is
  `int8` for an int8 file;
- `variant`: the sha256 of the safetensors variant file it came from;
- `precision`: `float32` or `int8`;
- `parent`: int8 files only, the sha256 of the float32 ONNX file it was quantized from.

`described` checks them all and gives them back as `OnnxMetadata`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import PrunefleetError
from common.files import is_sha256_hex
from common.variant_spec import MAX_VARIANT_BYTES, VariantError, VariantSpec

FORMAT = "prunefleet.onnx/1"
INPUT, OUTPUT = "input", "logits"  # [batch, C, H, W] normalized pixels -> [batch, classes] logits
FLOAT32, INT8 = "float32", "int8"
PRECISIONS = (FLOAT32, INT8)
MAX_ONNX_BYTES = MAX_VARIANT_BYTES  # as large as a variant file may be, under protobuf's 2 GiB
FORMAT_KEY, SPEC_KEY, VARIANT_KEY, PRECISION_KEY, PARENT_KEY = "format", "spec", "variant", "precision", "parent"
METADATA_KEYS = (FORMAT_KEY, SPEC_KEY, VARIANT_KEY, PRECISION_KEY, PARENT_KEY)


class OnnxFormatError(PrunefleetError, ValueError):
    """An ONNX file whose metadata does not say what prunefleet needs to know; the message says why."""


@dataclass(frozen=True)
class OnnxMetadata:
    """What an ONNX variant file says it is: its spec, precision, the safetensors variant it came from
    and, for int8, the float32 ONNX file it was quantized from."""

    spec: VariantSpec
    precision: str
    variant: str
    parent: str | None


def described(props: Mapping[str, str]) -> OnnxMetadata:
    """The metadata of an ONNX variant file (its `metadata_props` as a mapping), checked: the format
    is this one, the precision known and the spec's own, the source variant a sha256, and a parent
    named by int8 files and only by them. OnnxFormatError names the first problem."""
    if props.get(FORMAT_KEY) != FORMAT:
        raise OnnxFormatError(f"ONNX file format is {props.get(FORMAT_KEY)!r}, expected {FORMAT!r}")
    precision, variant, parent = props.get(PRECISION_KEY), props.get(VARIANT_KEY, ""), props.get(PARENT_KEY)
    if precision not in PRECISIONS:
        raise OnnxFormatError(f"ONNX file precision is {precision!r}, expected one of {', '.join(PRECISIONS)}")
    if not is_sha256_hex(variant):
        raise OnnxFormatError(f"ONNX file names no variant it came from (variant {variant[:80]!r})")
    if (precision == INT8) != (parent is not None) or not (parent is None or is_sha256_hex(parent)):
        raise OnnxFormatError(f"an int8 ONNX file, and only one, names its float32 parent (parent {parent!r})")
    try:
        spec = VariantSpec.from_json(props.get(SPEC_KEY, ""))
    except VariantError as err:
        raise OnnxFormatError(f"the ONNX file's spec is malformed: {err}") from err
    if spec.precision != precision:
        raise OnnxFormatError(f"the spec says {spec.precision!r}, the file {precision!r}")
    return OnnxMetadata(spec, precision, variant, parent)
