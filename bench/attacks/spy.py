"""The spy: a Predict server holding edge-b's certificate (a compromised edge), registered by edge-b as
its own address. Every tool that sends load or images to the fleet's edges reaches it; none may hand
it the operator's token, even when the operator's own certificate directory is what the tool is given."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from PIL import Image

from bench.attacks.arena import RPC_S, Arena, cli
from bench.attacks.records import Finding, Refusals
from cloud.localfleet.loadgen import LoadGenerator, Phase
from common.security import AUTHORIZATION
from protos import coordinator_pb2, inference_pb2_grpc

WAIT_S = 40.0  # a tool that imports torch and discovers the fleet first needs a few seconds


class Spy(inference_pb2_grpc.InferenceServiceServicer):
    """Records every call's metadata and refuses it."""

    def __init__(self):
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def _record(self, context):
        with self._lock:
            self.calls.append({key: value for key, value in context.invocation_metadata()})
        context.abort(grpc.StatusCode.UNAVAILABLE, "spy")

    def Predict(self, request, context):
        self._record(context)

    def Describe(self, request, context):
        self._record(context)

    def seen(self) -> int:
        with self._lock:
            return len(self.calls)

    def since(self, start: int) -> list[dict]:
        with self._lock:
            return self.calls[start:]


def _until(spy: Spy, start: int, timeout_s: float = WAIT_S) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while spy.seen() == start and time.monotonic() < deadline:
        time.sleep(0.1)
    return spy.since(start)


def _verdict(found: Refusals, tool: str, calls: list[dict]) -> None:
    leaked = sum(AUTHORIZATION in call for call in calls)
    found.check(
        tool,
        bool(calls) and not leaked,
        f"{len(calls)} call(s) reached the spy, {leaked} with a token" if calls else "never reached the spy (untested)",
    )


def _cluster_load(arena: Arena, spy: Spy, found: Refusals) -> None:
    operator = str(arena.holder("operator"))
    start = spy.seen()
    args = ["cluster", "load", "--cloud", arena.cloud.address, "--certs", operator, "--client-certs", operator]
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", *args, "--clients", "1", "--batch", "1", "--round-s", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        calls = _until(spy, start)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _verdict(found, "prunefleet cluster load --certs OPERATOR --client-certs OPERATOR", calls)


def _demo_load(arena: Arena, spy: Spy, address: str, found: Refusals) -> None:
    start = spy.seen()
    images = np.zeros((4, 1, 28, 28), dtype=np.uint8)
    generator = LoadGenerator({"edge-b": address}, images, 1, arena.transport("operator", token=True), timeout_s=5)
    generator.run([Phase("spied", 1.0, 1)])
    _verdict(found, "the demo's load generator handed the operator's transport", _until(spy, start, 5))


def _predict(arena: Arena, spy: Spy, address: str, found: Refusals) -> None:
    image = arena.work / "shirt.png"
    Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)).save(image)
    start = spy.seen()
    result = cli("predict", "--edge", address, str(image), env={"PRUNEFLEET_CERTS": str(arena.holder("operator"))})
    _verdict(
        found, f"prunefleet predict with PRUNEFLEET_CERTS=OPERATOR (exit {result.returncode})", _until(spy, start, 5)
    )


def spy_sees_no_token(arena: Arena) -> Finding:
    found, spy = Refusals(), Spy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(spy, server)
    port = server.add_secure_port("127.0.0.1:0", arena.transport("edge-b").server_credentials())
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        arena.register("edge-b", address)
        arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S)
        _cluster_load(arena, spy, found)
        _demo_load(arena, spy, address, found)
        _predict(arena, spy, address, found)
        found.measured = {"calls_seen": spy.seen()}
    finally:
        server.stop(0)
    return found.finding()
