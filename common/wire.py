"""Helpers for what crosses the wire: tensors, message size bounds, channel options."""

from __future__ import annotations

import numpy as np

from common.errors import PrunefleetError
from protos import inference_pb2

MAX_MESSAGE_BYTES = 8 << 20
CHUNK_BYTES = 1 << 20
DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}

GRPC_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # reconnect within seconds once a peer is back, not after gRPC's default of up to two minutes
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # accept HTTP/2 frames up to 4 MiB (default 16 KiB): a 1 MiB chunk goes in one frame instead of 64
    ("grpc.http2.max_frame_size", 4 << 20),
)
SERVER_OPTIONS = GRPC_OPTIONS + (("grpc.http2.min_ping_interval_without_data_ms", 5_000),)
# Clients read ahead a quarter of a chunk per stream: a fixed flow-control window instead of gRPC's
# bandwidth-delay probing, which lets a fast sender run megabytes ahead of a slow reader. A client that
# drops a download (cancelled, or its process killed) loses what gRPC held for it but had not handed
# over: up to the next chunk and this window, so a smaller window loses less (measured against half a
# chunk; the transfer suite's cancelled download in docs/results.md).
CHANNEL_OPTIONS = GRPC_OPTIONS + (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", CHUNK_BYTES // 4))


class TensorError(PrunefleetError, ValueError):
    """A tensor message that cannot be used; the message names the problem."""


def to_proto(array: np.ndarray) -> inference_pb2.Tensor:
    name = next((n for n, d in DTYPES.items() if d == array.dtype.newbyteorder("<")), None)
    if name is None:
        raise TensorError(f"dtype {array.dtype} is not one of {sorted(DTYPES)}")
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    return inference_pb2.Tensor(shape=list(array.shape), dtype=name, data=data)


def from_proto(tensor: inference_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor, checking dtype, shape and byte count against each other."""
    if tensor.dtype not in DTYPES:
        raise TensorError(f"dtype {tensor.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    dtype = DTYPES[tensor.dtype]
    count = 1
    for d in shape:
        count *= d
        if count * dtype.itemsize > MAX_MESSAGE_BYTES:
            raise TensorError(f"shape {list(shape)} is larger than the {MAX_MESSAGE_BYTES}-byte limit")
    if len(tensor.data) != count * dtype.itemsize:
        raise TensorError(
            f"data holds {len(tensor.data)} bytes but shape {list(shape)} of {tensor.dtype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def pixels_to_unit(array: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1]: uint8 inputs are scaled, float inputs must be finite."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if not np.isfinite(array).all():
        raise TensorError("input holds NaN or Inf")
    return array
