"""An ONNX variant served by ONNX Runtime, without torch: what an edge needs to serve the second artifact.

An ONNX variant (`cloud.build.onnx_export`, float32 or int8) is one file whose `metadata_props` say
what it is (`common.onnx_format`, the format cloud and edge share): `format`, the variant's `spec`
(`common.variant_spec.VariantSpec`'s JSON), `variant` (the id of the safetensors variant it came from),
`precision` (`float32` or `int8`) and, for int8, `parent` (the id of the float32 file it was quantized
from). `open_bytes` and `open_file` refuse, before ONNX Runtime runs anything:

- a file over the size bound, or whose sha256 is not the id expected;
- any tensor that refers to data outside the file (`data_location` EXTERNAL or `external_data`
  entries) anywhere: initializers, sparse initializers, node attributes, subgraphs, functions,
  training graphs. Opened from bytes, ONNX Runtime reads such data from a path relative to the working
  directory, `..` included. The check walks the protobuf wire format itself, so an edge needs no `onnx`
  package: it reads the tags of the messages that can hold a tensor and skips every payload in one
  step, in time linear in the file;
- metadata that does not say all of the above, or a spec the variant file's readers would refuse;
- anything but one float input [batch, C, H, W] and one output [batch, classes] of the spec's shapes.

Sessions run on the CPU provider, sequentially, every graph optimization on: on a trained VGG-11 at
width 0.5 and one thread, the extended level (no layout changes) ran 2x slower (0.445 against 0.225 ms
at batch 1, 30.8 against 15.1 ms at batch 32), no optimization 2.5-3x. Idle threads do not spin by
default: at 2 threads on a shared 2-core machine spinning tied at batch 1 and lost at batch 32 (int8:
30.8 against 3.5 ms). `OrtModel.run` takes what the torch edge takes (uint8 pixels, or float32 in
[0, 1]) and normalizes as `edge.runtime` does, `(x - mean) / std` per channel in float32.

This module and what it imports (`common.wire`, `common.onnx_format`, `common.variant_spec`,
`common.files`, `common.errors`) load without torch, so `prunefleet-edge run --backend onnxruntime`
can run where torch is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from common.errors import PrunefleetError
from common.files import sha256_bytes
from common.onnx_format import MAX_ONNX_BYTES, OnnxFormatError, OnnxMetadata, described
from common.variant_spec import VariantSpec
from common.wire import TensorError, pixels_to_unit

MAX_NESTING = 32  # messages within messages the external-data check follows (a graph in an attribute ...)
MAX_FIELDS = 1 << 22  # protobuf fields the check reads: far above any exported CNN, far below a stall
INPUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class OrtModelError(PrunefleetError, ValueError):
    """An ONNX variant file that must not be served; the message says why."""


@dataclass(frozen=True)
class OrtConfig:
    """How an ONNX variant is served: ONNX Runtime's intra-op threads (size them to the device, like the
    torch backend's), whether idle threads spin (see the module docstring), the largest batch taken and
    the largest file opened."""

    threads: int = 1
    spinning: bool = False
    max_batch: int = 256
    max_bytes: int = MAX_ONNX_BYTES

    def __post_init__(self) -> None:
        if self.threads < 1 or self.max_batch < 1:
            raise ValueError(f"threads and max_batch must be >= 1, got {self.threads} and {self.max_batch}")
        if not 0 < self.max_bytes <= MAX_ONNX_BYTES:
            raise ValueError(f"max_bytes must be in [1, {MAX_ONNX_BYTES}], got {self.max_bytes}")


# The protobuf messages of onnx.proto that can hold a TensorProto, and where: (message, field) -> message.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_NESTED = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t g tensors graphs
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _TENSOR: {},
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1  # TensorProto fields, and DataLocation.EXTERNAL


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
    raise OrtModelError("the file is not an ONNX model: a protobuf number runs past its message")


def _fields(data: memoryview, start: int, end: int, budget: list[int]):
    """(field number, varint value or None, (begin, end) of a length-delimited payload or None)."""
    pos = start
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise OrtModelError(f"the file holds over {MAX_FIELDS} protobuf fields; refused unchecked")
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        value = span = None
        if wire == 0:
            value, pos = _varint(data, pos, end)
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            span, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise OrtModelError(f"the file is not an ONNX model: protobuf wire type {wire}")
        if pos > end:
            raise OrtModelError("the file is not an ONNX model: a protobuf field runs past its message")
        yield number, value, span


def _refuse_external_data(data: bytes) -> None:
    """OrtModelError if any tensor of the model refers to data outside the file."""
    view, budget = memoryview(data), [MAX_FIELDS]
    pending = [(_MODEL, 0, len(data), 0)]
    while pending:
        kind, start, end, depth = pending.pop()
        for number, value, span in _fields(view, start, end, budget):
            if kind == _TENSOR and (number == _EXTERNAL_DATA or (number == _DATA_LOCATION and value == _EXTERNAL)):
                raise OrtModelError("a tensor refers to external data; an ONNX variant must hold all its weights")
            child = _NESTED[kind].get(number)
            if child is not None and span is not None:
                if depth >= MAX_NESTING:
                    raise OrtModelError(f"the model nests messages over {MAX_NESTING} deep")
                pending.append((child, *span, depth + 1))


def _session(data: bytes, config: OrtConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: a refused file is reported by the caller
    options.add_session_config_entry("session.load_model_format", "ONNX")  # never the ORT flatbuffer format
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's errors share no base class but Exception
        raise OrtModelError(f"ONNX Runtime refuses the file: {err}") from err


def _metadata(runner: ort.InferenceSession) -> OnnxMetadata:
    """What the file says it is (`common.onnx_format.described`)."""
    try:
        return described(dict(runner.get_modelmeta().custom_metadata_map))
    except OnnxFormatError as err:
        raise OrtModelError(str(err)) from err


def _signature(runner: ort.InferenceSession, spec: VariantSpec) -> tuple[str, str]:
    """The names of the one input and the one output, checked against the spec's shapes."""
    inputs, outputs = runner.get_inputs(), runner.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise OrtModelError(f"the model takes {len(inputs)} inputs and gives {len(outputs)} outputs, expected 1 and 1")
    given, taken = inputs[0], outputs[0]
    if given.type != "tensor(float)" or len(given.shape) != 4 or tuple(given.shape[1:]) != spec.input_shape:
        raise OrtModelError(f"the model takes {given.type} {given.shape}, the spec says [batch, {spec.input_shape}]")
    if isinstance(given.shape[0], int) or len(taken.shape) != 2 or taken.shape[1] != spec.num_classes:
        raise OrtModelError(
            f"the model maps {given.shape} to {taken.shape}, expected [batch, ...] to [batch, {spec.num_classes}]"
        )
    return given.name, taken.name


@dataclass(frozen=True, eq=False)
class OrtModel:
    """An ONNX variant ready to serve: its session, spec and normalization, and the ids that name it
    (`sha256`: this file; `variant_id`: the safetensors variant it came from; `parent`: for int8, the
    float32 file it was quantized from)."""

    sha256: str
    size_bytes: int
    spec: VariantSpec
    precision: str
    variant_id: str
    parent: str | None
    session: ort.InferenceSession = field(repr=False)
    input_name: str
    output_name: str
    max_batch: int
    mean: np.ndarray = field(init=False, repr=False)  # float32 [1, C, 1, 1]
    std: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = (1, self.spec.input_shape[0], 1, 1)
        object.__setattr__(self, "mean", np.asarray(self.spec.mean, dtype=np.float32).reshape(shape))
        object.__setattr__(self, "std", np.asarray(self.spec.std, dtype=np.float32).reshape(shape))

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """A batch of pixels as the model's input: checked (dtype, shape, batch bound), scaled to [0, 1]
        and normalized per channel, float32 and contiguous. TensorError names what is wrong."""
        dims = ", ".join(map(str, self.spec.input_shape))
        expected = f"expected shape [N, {dims}] with 1 <= N <= {self.max_batch}"
        if batch.dtype not in INPUT_DTYPES:
            raise TensorError(f"dtype {batch.dtype} is not supported: send uint8 pixels or float32; {expected}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.spec.input_shape or not 1 <= len(batch) <= self.max_batch:
            raise TensorError(f"{expected}, got {list(batch.shape)}")
        return np.ascontiguousarray((pixels_to_unit(batch) - self.mean) / self.std, dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (float32 [N, classes]) for uint8 pixels or float32 in [0, 1], [N, C, H, W]."""
        return self._logits(self.prepare(batch))

    def forward(self, unit: np.ndarray) -> np.ndarray:
        """Logits for a batch the runtime already checked (float32 in [0, 1], [N, C, H, W] of the spec's
        shape): normalized as `prepare` does, then run. ONNX Runtime's own failures are RuntimeErrors,
        as torch's are, so the edge answers them the same way."""
        return self._logits(np.ascontiguousarray((unit - self.mean) / self.std, dtype=np.float32))

    def _logits(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as err:  # onnxruntime's errors share no base class but Exception
            raise RuntimeError(f"ONNX Runtime failed: {err}") from err


def open_bytes(data: bytes, config: OrtConfig = OrtConfig(), expected_sha256: str | None = None) -> OrtModel:
    """Check an ONNX variant file's bytes (see the module docstring) and make it ready to serve."""
    if len(data) > config.max_bytes:
        raise OrtModelError(f"ONNX file is {len(data)} bytes, over the {config.max_bytes}-byte limit")
    sha256 = sha256_bytes(data)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise OrtModelError(f"ONNX file sha256 does not match {expected_sha256}")
    _refuse_external_data(data)
    runner = _session(data, config)
    meta = _metadata(runner)
    signature = _signature(runner, meta.spec)
    return OrtModel(
        sha256, len(data), meta.spec, meta.precision, meta.variant, meta.parent, runner, *signature, config.max_batch
    )


def open_file(path: Path, config: OrtConfig = OrtConfig(), expected_sha256: str | None = None) -> OrtModel:
    """`open_bytes` of a file, its size checked before it is read."""
    path = Path(path)
    size = path.stat().st_size
    if size > config.max_bytes:
        raise OrtModelError(f"{path.name} is {size} bytes, over the {config.max_bytes}-byte limit")
    return open_bytes(path.read_bytes(), config, expected_sha256)
