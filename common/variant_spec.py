"""What a variant is, without torch: its spec, the bounds of its file, and the spec read from the
file's header.

A variant file (`common.variant`) is a safetensors file whose header metadata holds `format` =
`FORMAT` and the variant's `spec` as JSON. Everything here is plain Python and JSON, so a process
that never builds a model (an ONNX Runtime edge, a load generator reading the shape of a portfolio's
inputs) reads and checks specs exactly as the torch readers do. `header_spec` reads the spec from the
first bytes of a file, so a caller holding only the start of a download knows what it is fetching.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field

from common.errors import PrunefleetError

FORMAT = "prunefleet.variant/1"
MAX_VARIANT_BYTES = 1 << 30
MAX_HEADER_BYTES = 16 << 20
MAX_INPUT_VALUES = 1 << 21  # one sample as float32 fits in a Predict message (8 MiB)
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 200
FLOAT32 = "float32"  # the precision of a spec whose `extra` names none


class VariantError(PrunefleetError, ValueError):
    """A variant file that must not be used; the message says why."""


@dataclass(frozen=True)
class VariantSpec:
    """What a variant is and how it is fed: its architecture and constructor arguments, one sample's
    shape, its classes, the normalization of its input, and how it was made and scored. Checked on
    construction, so a spec read from any file is one the readers can act on."""

    arch: str
    kwargs: dict
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    sparsity: float
    accuracy: float
    name: str = ""
    level: int = 0
    extra: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # the name of each class, in output order (empty: unnamed)

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or any(int(d) <= 0 for d in self.input_shape):
            raise VariantError(f"input_shape must be [C, H, W] of positive ints, got {self.input_shape}")
        if math.prod(self.input_shape) > MAX_INPUT_VALUES:
            raise VariantError(f"input_shape {list(self.input_shape)} holds over {MAX_INPUT_VALUES} values per sample")
        if self.num_classes <= 0:
            raise VariantError(f"num_classes must be positive, got {self.num_classes}")
        if len(self.mean) != self.input_shape[0] or len(self.std) != self.input_shape[0]:
            raise VariantError(f"mean and std need one value per input channel ({self.input_shape[0]})")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise VariantError(f"mean and std must be finite, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise VariantError(f"std must be positive, got {self.std}")
        if not 0.0 <= self.sparsity <= 1.0:
            raise VariantError(f"sparsity must be in [0, 1], got {self.sparsity}")
        if not isinstance(self.extra, dict):
            raise VariantError(f"extra must be an object, got {type(self.extra).__name__}")
        self._check_classes()

    def _check_classes(self) -> None:
        if self.num_classes > MAX_CLASSES:
            raise VariantError(f"num_classes {self.num_classes} is over the limit of {MAX_CLASSES}")
        if not self.classes:
            return
        if len(self.classes) != self.num_classes:
            raise VariantError(f"classes names {len(self.classes)} classes, the model has {self.num_classes}")
        for name in self.classes:
            if not isinstance(name, str) or not name or len(name) > MAX_CLASS_NAME_CHARS or not name.isprintable():
                raise VariantError(
                    f"class name {str(name)[:40]!r} must be printable text of 1 to {MAX_CLASS_NAME_CHARS} characters"
                )

    @property
    def precision(self) -> str:
        """The precision its weights are served at: `extra.precision` (an int8 ONNX file's spec says
        `int8`), else float32."""
        return str(self.extra.get("precision", FLOAT32))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VariantSpec:
        try:
            raw = json.loads(text)
            raw["input_shape"] = tuple(int(d) for d in raw["input_shape"])
            raw["mean"] = tuple(float(v) for v in raw["mean"])
            raw["std"] = tuple(float(v) for v in raw["std"])
            raw["classes"] = tuple(raw.get("classes", ()))
            return cls(**raw)
        except (KeyError, TypeError, ValueError, ArithmeticError, RecursionError) as err:
            if isinstance(err, VariantError):
                raise
            raise VariantError(f"variant spec is malformed: {err}") from err


def header_metadata(prefix: bytes) -> dict[str, str] | None:
    """The `__metadata__` of the safetensors header that `prefix`, the first bytes of a variant file,
    begins with; None while `prefix` does not yet hold the whole header. VariantError when the header
    declares more than `MAX_HEADER_BYTES` or is not a JSON object with metadata."""
    if len(prefix) < 8:
        return None
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES:
        raise VariantError(f"variant header declares {header_len} bytes, beyond the {MAX_HEADER_BYTES}-byte limit")
    if len(prefix) < 8 + header_len:
        return None
    try:
        header = json.loads(prefix[8 : 8 + header_len])
    except (ValueError, RecursionError) as err:  # not UTF-8 or JSON, a number too long, nesting too deep
        raise VariantError(f"variant header is not JSON: {err}") from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise VariantError("variant header has no metadata")
    return metadata


def metadata_spec(metadata: dict[str, str]) -> VariantSpec:
    """The spec a variant header's metadata holds, once its format is this one. No allow-list is
    applied: building the architecture is `common.variant`'s, which checks it first."""
    if metadata.get("format") != FORMAT:
        raise VariantError(f"variant format is {metadata.get('format')!r}, expected {FORMAT!r}")
    spec = metadata.get("spec", "")
    if not isinstance(spec, str):
        raise VariantError(f"variant spec must be a JSON string, got {type(spec).__name__}")
    return VariantSpec.from_json(spec)


def header_spec(prefix: bytes) -> VariantSpec | None:
    """The spec of the variant file whose first bytes are `prefix`; None while they do not yet hold
    its whole header. VariantError for a header that is malformed, over the bound, or of another
    format."""
    metadata = header_metadata(prefix)
    return None if metadata is None else metadata_spec(metadata)
