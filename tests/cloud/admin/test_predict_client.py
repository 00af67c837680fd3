"""The predict client against a scripted InferenceService on loopback: batching within the edge's bound,
switches between batches, class names or indices, and answers it must refuse."""

from __future__ import annotations

import json
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from PIL import Image

from cloud.admin import predict_client
from cloud.admin.predict_client import PredictError, Serving
from cloud.build.images import ImageError
from common.security import Transport
from common.wire import from_proto, to_proto
from protos import inference_pb2, inference_pb2_grpc

NAMES = ("dark", "dim", "light", "bright")


@dataclass(frozen=True)
class Fake:
    variant_id: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...] = NAMES


class ScriptedEdge(inference_pb2_grpc.InferenceServiceServicer):
    """Answers class `mean pixel // 64` of 4; switches to `then` after `switch_after` Predicts."""

    def __init__(self, first: Fake, then: Fake | None = None, switch_after: int = 0, max_batch: int = 3):
        self.current, self.then, self.switch_after, self.max_batch = first, then, switch_after, max_batch
        self.batches: list[tuple[str, int]] = []

    def Describe(self, request, context):
        v = self.current
        return inference_pb2.DescribeResponse(
            variant_id=v.variant_id,
            name=v.variant_id,
            input_shape=list(v.input_shape),
            mean=[0.5],
            std=[0.25],
            num_classes=4,
            classes=list(v.classes),
            max_batch=self.max_batch,
        )

    def Predict(self, request, context):
        if self.then is not None and len(self.batches) == self.switch_after:
            self.current = self.then
        pixels = from_proto(request.input)
        if pixels.shape[1:] != self.current.input_shape or len(pixels) > self.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected [N, {self.current.input_shape}]")
        self.batches.append((self.current.variant_id, len(pixels)))
        classes = pixels.reshape(len(pixels), -1).mean(axis=1).astype(int) // 64
        logits = np.eye(4, dtype=np.float32)[classes] * 5.0
        return inference_pb2.PredictResponse(output=to_proto(logits), variant_id=self.current.variant_id)


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def _images(tmp_path, values, size=28) -> list[str]:
    paths = []
    for i, value in enumerate(values):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
        paths.append(str(path))
    return paths


VALUES = [10, 70, 130, 200, 250, 0, 100]
EXPECTED = [NAMES[v // 64] for v in VALUES]


def test_images_go_in_batches_within_the_edge_bound_and_come_back_named(serve, tmp_path):
    edge = ScriptedEdge(Fake("a" * 64, (1, 28, 28)))
    predictions = predict_client.classify(serve(edge), Transport.plaintext(), _images(tmp_path, VALUES))
    assert [n for _, n in edge.batches] == [3, 3, 1]
    assert [p.guesses[0].name for p in predictions] == EXPECTED
    assert all(p.guesses[0].probability > 0.9 for p in predictions)


def test_a_switch_to_the_same_shape_reads_answers_with_the_new_names(serve, tmp_path):
    renamed = tuple(name.upper() for name in NAMES)
    edge = ScriptedEdge(Fake("a" * 64, (1, 28, 28)), Fake("b" * 64, (1, 28, 28), renamed), switch_after=1)
    predictions = predict_client.classify(serve(edge), Transport.plaintext(), _images(tmp_path, VALUES))
    assert [p.variant_id[0] for p in predictions] == ["a"] * 3 + ["b"] * 4
    assert [p.guesses[0].name for p in predictions] == EXPECTED[:3] + [n.upper() for n in EXPECTED[3:]]


def test_a_switch_to_another_shape_prepares_the_images_again(serve, tmp_path):
    edge = ScriptedEdge(Fake("a" * 64, (1, 28, 28)), Fake("c" * 64, (3, 14, 14)), switch_after=1)
    predictions = predict_client.classify(serve(edge), Transport.plaintext(), _images(tmp_path, VALUES))
    assert {p.variant_id[0] for p in predictions} == {"c"}
    assert [p.guesses[0].name for p in predictions] == EXPECTED


def test_an_unreadable_image_stops_everything_before_a_predict(serve, tmp_path):
    edge = ScriptedEdge(Fake("a" * 64, (1, 28, 28)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ImageError, match="broken.png"):
        predict_client.classify(serve(edge), Transport.plaintext(), [*_images(tmp_path, [1]), str(broken)])
    assert edge.batches == []


def test_top_k_is_sorted_and_unnamed_classes_are_indices(serve, tmp_path):
    edge = ScriptedEdge(Fake("a" * 64, (1, 28, 28), classes=()))
    predictions = predict_client.classify(serve(edge), Transport.plaintext(), _images(tmp_path, [130]), top=9)
    guesses = predictions[0].guesses
    assert len(guesses) == 4 and guesses[0].index == 2 and guesses[0].name is None
    assert [g.probability for g in guesses] == sorted((g.probability for g in guesses), reverse=True)
    assert sum(g.probability for g in guesses) == pytest.approx(1.0)
    line = predict_client.as_lines(predictions)
    assert line.split("\t")[:3] == [predictions[0].image, "2", f"{guesses[0].probability:.4f}"]
    document = json.loads(predict_client.as_json(predictions))
    assert document[0]["predictions"][0] == {"class": None, "index": 2, "probability": guesses[0].probability}


def test_batch_size_keeps_pixels_and_logits_within_the_message_limit():
    big = Serving("v", "v", (3, 1024, 1024), 10, (), 256)
    assert big.batch_size() == 2  # 3 MiB a sample in an 8 MiB message
    many_classes = Serving("v", "v", (1, 28, 28), 100_000, (), 256)
    assert many_classes.batch_size() == 20  # 400 kB of logits a sample
    assert Serving("v", "v", (1, 28, 28), 10, (), 5).batch_size() == 5


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (dict(input_shape=[2, 28, 28]), "2 channels"),
        (dict(input_shape=[28, 28]), "not \\[C, H, W\\]"),
        (dict(classes=["one"]), "names 1 classes of 4"),
        (dict(max_batch=0), "batches of 0"),
    ],
)
def test_unusable_descriptions_are_refused(fields, problem):
    reply = {**dict(variant_id="v", input_shape=[1, 28, 28], num_classes=4, max_batch=8), **fields}
    with pytest.raises(PredictError, match=problem):
        predict_client.serving_from(inference_pb2.DescribeResponse(**reply))
