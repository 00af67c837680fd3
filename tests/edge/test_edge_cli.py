"""`prunefleet-edge run` as a real process against an in-process fake cloud: the serving line, real
answers, metrics, telemetry, and a clean exit on SIGTERM."""

import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from edge_helpers import FakeCloud, portfolio_of, wait_for

from common.wire import to_proto
from protos import inference_pb2, inference_pb2_grpc

SERVING = re.compile(r"^prunefleet-edge edge-c serving on (127\.0\.0\.1:\d+) metrics on (127\.0\.0\.1:\d+)$")


@pytest.fixture
def cloud(tmp_path):
    files, infos = portfolio_of(tmp_path / "variants", [("small", 0.125, 0.80), ("big", 0.25, 0.85)])
    cloud = FakeCloud(files, infos)
    cloud.start()
    yield cloud
    cloud.stop()


def _lines(stream) -> queue.Queue:
    """The stream's lines as they come, then None at its end."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_run_serves_reports_and_exits_cleanly_on_sigterm(cloud, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "run",
            "--cloud",
            f"127.0.0.1:{cloud.port}",
            "--name",
            "edge-c",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--cache",
            str(tmp_path / "cache"),
            "--batch",
            "4",
            "--window-s",
            "0.2",
            "--log-level",
            "warning",
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = _lines(process.stdout)
        first = lines.get(timeout=60)
        match = SERVING.match(first.rstrip("\n")) if first else None
        assert match, f"unexpected first line {first!r}; stderr: {'' if first else process.stderr.read()}"
        address, metrics_address = match.groups()
        stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
        pixels = np.zeros((4, 1, 28, 28), np.uint8)
        reply = stub.Predict(inference_pb2.PredictRequest(input=to_proto(pixels)), timeout=10)
        assert reply.variant_id in cloud.files and reply.output.shape == [4, 10]
        metrics = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
        assert f'prunefleet_edge_active_variant{{edge="edge-c",variant="{reply.variant_id[:12]}"}} 1.0' in metrics
        wait_for(
            lambda: any(r.WhichOneof("body") == "telemetry" and r.telemetry.requests for r in cloud.reports),
            what="telemetry counting the request",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert lines.get(timeout=5) is None  # exactly one line on stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_edge_imports_nothing_from_the_cloud_side():
    code = (
        "import sys, edge.cli, edge.agent, edge.profiler\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cloud', 'torch_pruning', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_variants_are_served_optimized_unless_the_operator_says_otherwise():
    from edge import cli

    base = ["run", "--cloud", "127.0.0.1:1", "--name", "e", "--cache", "cache", "--insecure"]
    assert cli._config(cli._parser({}).parse_args(base)).optimize_models
    assert not cli._config(cli._parser({}).parse_args([*base, "--no-optimize-models"])).optimize_models
