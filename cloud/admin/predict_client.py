"""A person's images through an edge: describe its variant, prepare the images, predict, read the answers.

`classify` asks the edge which variant serves (`Describe`), opens and prepares every image the way that
variant was trained (`cloud.build.images`) before anything is sent, then sends the pixels as uint8 in
batches that fit the message limit and the edge's batch bound; the edge normalizes them with the
variant's own mean and std. Logits become probabilities with a softmax.

The edge may switch variants between two batches. An answer from another variant with the same input
shape is read with that variant's description (its class names); if the input shape changed, the images
are prepared again for the new variant, a few times at most.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from cloud.build.images import open_image, preprocess
from common.errors import PrunefleetError
from common.files import short_id
from common.security import Transport
from common.wire import MAX_MESSAGE_BYTES, TensorError, from_proto, to_proto
from protos import inference_pb2, inference_pb2_grpc

RPC_TIMEOUT_S = 30.0
MESSAGE_MARGIN_BYTES = 64 << 10  # room for everything in a message besides the pixels or logits
MAX_ATTEMPTS = 3  # images prepared again at most this often when the edge switches input shape


class PredictError(PrunefleetError, ValueError):
    """An edge answer that cannot be used; the message says what is wrong with it."""


class _Switched(Exception):
    """The edge now serves a variant that takes another input shape than the images were prepared for."""


@dataclass(frozen=True)
class Serving:
    """What Describe says about the variant an edge serves."""

    variant_id: str
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: tuple[str, ...]
    max_batch: int

    def class_name(self, index: int) -> str | None:
        return self.classes[index] if self.classes else None

    def batch_size(self) -> int:
        """Samples per Predict: within the edge's bound, and pixels and logits within the message limit."""
        room = MAX_MESSAGE_BYTES - MESSAGE_MARGIN_BYTES
        per_sample = max(math.prod(self.input_shape), 4 * self.num_classes)
        return max(1, min(self.max_batch, room // per_sample))


@dataclass(frozen=True)
class Guess:
    index: int
    name: str | None
    probability: float


@dataclass(frozen=True)
class Prediction:
    """The most probable classes of one image, and the variant that answered."""

    image: str
    variant_id: str
    guesses: tuple[Guess, ...]


def serving_from(reply: inference_pb2.DescribeResponse) -> Serving:
    """A Describe answer checked for what preparing images and reading logits needs."""
    shape = tuple(int(d) for d in reply.input_shape)
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise PredictError(f"the edge describes input shape {list(shape)[:8]}, not [C, H, W]")
    if shape[0] not in (1, 3):
        raise PredictError(f"the edge's variant takes {shape[0]} channels; images give 1 or 3")
    if reply.num_classes <= 0 or reply.max_batch <= 0:
        raise PredictError(f"the edge describes {reply.num_classes} classes and batches of {reply.max_batch}")
    if reply.classes and len(reply.classes) != reply.num_classes:
        raise PredictError(f"the edge names {len(reply.classes)} classes of {reply.num_classes}")
    return Serving(reply.variant_id, reply.name, shape, reply.num_classes, tuple(reply.classes), reply.max_batch)


def describe(stub: inference_pb2_grpc.InferenceServiceStub) -> Serving:
    return serving_from(stub.Describe(inference_pb2.DescribeRequest(), timeout=RPC_TIMEOUT_S))


def prepare(paths: Sequence[str], input_shape: tuple[int, int, int]) -> np.ndarray:
    """Every image as uint8 `[N, C, H, W]`; the first unusable one raises ImageError naming it."""
    pixels = np.empty((len(paths), *input_shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        pixels[i] = preprocess(open_image(path), input_shape)
    return pixels


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_guesses(probabilities: np.ndarray, serving: Serving, top: int) -> tuple[Guess, ...]:
    order = np.argsort(-probabilities, kind="stable")[:top]
    return tuple(Guess(int(i), serving.class_name(int(i)), float(probabilities[i])) for i in order)


def _logits(reply: inference_pb2.PredictResponse, samples: int, serving: Serving) -> np.ndarray:
    try:
        logits = from_proto(reply.output)
    except TensorError as err:
        raise PredictError(f"the edge answered an unreadable tensor: {err}") from err
    if logits.shape != (samples, serving.num_classes):
        raise PredictError(
            f"the edge answered logits of shape {list(logits.shape)}, expected {[samples, serving.num_classes]}"
        )
    if not np.isfinite(logits).all():
        raise PredictError(f"variant {short_id(reply.variant_id)} answered logits that are not finite")
    return logits


def _answering(stub, reply: inference_pb2.PredictResponse, serving: Serving) -> Serving:
    """The description of the variant that answered: `serving` itself, or a fresh one after a switch."""
    if reply.variant_id == serving.variant_id:
        return serving
    fresh = describe(stub)
    if fresh.input_shape != serving.input_shape:
        raise _Switched
    if fresh.variant_id != reply.variant_id:
        raise PredictError("the edge switched variants twice during one batch; run again")
    return fresh


def _predict_batch(stub, batch: np.ndarray, serving: Serving) -> tuple[np.ndarray, Serving]:
    request = inference_pb2.PredictRequest(input=to_proto(batch))
    try:
        reply = stub.Predict(request, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and describe(stub).input_shape != serving.input_shape:
            raise _Switched from err
        raise
    answering = _answering(stub, reply, serving)
    return _logits(reply, len(batch), answering), answering


def _run(stub, paths: Sequence[str], serving: Serving, top: int) -> list[Prediction]:
    pixels = prepare(paths, serving.input_shape)
    predictions: list[Prediction] = []
    size = serving.batch_size()
    for start in range(0, len(paths), size):
        logits, serving = _predict_batch(stub, pixels[start : start + size], serving)
        for path, probabilities in zip(paths[start : start + size], softmax(logits), strict=True):
            predictions.append(Prediction(path, serving.variant_id, top_guesses(probabilities, serving, top)))
    return predictions


def classify(address: str, transport: Transport, paths: Sequence[str], top: int = 1) -> list[Prediction]:
    """The `top` most probable classes of every image, as the variant the edge at `address` serves sees it."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    channel = transport.for_edges().channel(address)  # never the operator token
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for _ in range(MAX_ATTEMPTS):
            try:
                return _run(stub, paths, describe(stub), top)
            except _Switched:
                continue
        raise PredictError(f"the edge changed its input shape {MAX_ATTEMPTS} times while predicting; run again")
    finally:
        channel.close()


def _label(guess: Guess) -> str:
    return guess.name if guess.name is not None else str(guess.index)


def as_lines(predictions: Sequence[Prediction]) -> str:
    """`IMAGE<TAB>CLASS<TAB>PROBABILITY` per image, one more class and probability per further guess."""
    lines = []
    for prediction in predictions:
        cells = [prediction.image]
        for guess in prediction.guesses:
            cells += [_label(guess), f"{guess.probability:.4f}"]
        lines.append("\t".join(cells))
    return "\n".join(lines)


def as_json(predictions: Sequence[Prediction]) -> str:
    """One JSON document: per image its name, the variant that answered and its guesses."""
    document = [
        {
            "image": prediction.image,
            "variant_id": prediction.variant_id,
            "predictions": [
                {"class": guess.name, "index": guess.index, "probability": guess.probability}
                for guess in prediction.guesses
            ],
        }
        for prediction in predictions
    ]
    return json.dumps(document, indent=2)
