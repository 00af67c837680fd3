"""The control plane with real processes on loopback, all mutual TLS: a cloud killed with SIGKILL in the
middle of a download, rollouts with canaries (automatic and manual rollback), a coordinator killed and
restarted (edges serve on meanwhile, their windows arrive afterwards) and an edge gone stale."""

import dataclasses
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import variant_store as _store
from helpers import wait_for

from cloud.admin import certs, operator_client
from cloud.build.store import PortfolioStore, portfolio_id
from cloud.localfleet import commands, processes
from cloud.localfleet.cluster import free_port
from common import variant
from common.security import Transport
from common.wire import to_proto
from edge.fetcher import RetryConfig, fetch
from edge.listing_guard import STATE_NAME, load_accepted
from protos import (
    coordinator_pb2,
    inference_pb2,
    inference_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)

pytestmark = pytest.mark.integration
PRUNEFLEET = str(Path(sys.executable).parent / "prunefleet")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return certs.init(tmp_path_factory.mktemp("certs"))


def _cloud(store: Path, run: Path, keys, port: int, name: str = "cloud") -> processes.Child:
    args = commands.cloud_args(store, db=run / "fleet.sqlite", certs=keys["cloud"], port=port)
    return processes.start(name, args, run / "logs")


class SlowReader:
    """The real stub, read like a slow link: a pause after every chunk, and each request's offset noted."""

    def __init__(self, stub, pause_s: float):
        self._stub, self._pause_s, self.offsets = stub, pause_s, []

    def FetchVariant(self, request, timeout=None):
        self.offsets.append(request.offset)
        for chunk in self._stub.FetchVariant(request, timeout=timeout):
            yield chunk
            time.sleep(self._pause_s)


def test_a_cloud_killed_mid_transfer_is_resumed_from_where_it_stopped(keys, tmp_path):
    store = _store(tmp_path / "store", widths=(0.5,))
    big = store.manifest().variants[0]
    assert big.size_bytes > 8 << 20  # many more chunks than the client reads ahead
    port = free_port("127.0.0.1")
    cloud = _cloud(store.root, tmp_path, keys, port)
    reader = SlowReader(
        portfolio_pb2_grpc.PortfolioServiceStub(Transport.load(keys["edge"]).channel(f"localhost:{port}")), pause_s=0.4
    )
    cache, outcome = tmp_path / "cache", {}
    part, final = cache / f"{big.variant_id}.part", cache / f"{big.variant_id}.safetensors"

    def download():
        try:
            outcome["path"] = fetch(
                reader,
                big.variant_id,
                cache,
                deadline_s=60,
                retry=RetryConfig(attempts=30, backoff_s=0.2, max_backoff_s=1.0),
            )
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=download)
    thread.start()
    try:
        wait_for(lambda: part.exists() and part.stat().st_size >= 1 << 20, 30, "the first chunk on disk")
        cloud.process.send_signal(signal.SIGKILL)
        cloud.process.wait(10)
        time.sleep(1.0)  # the edge notices and starts retrying
        kept = part.stat().st_size
        assert 0 < kept < big.size_bytes and not final.exists()  # a partial file is never in place
        cloud = _cloud(store.root, tmp_path, keys, port, "cloud-again")
        thread.join(60)
    finally:
        cloud.stop()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["path"] == final and not part.exists()
    assert reader.offsets[0] == 0 and reader.offsets[-1] >= kept  # resumed, never started over
    assert all(offset > 0 for offset in reader.offsets[1:])
    held = variant.load(final, expected_sha256=big.variant_id)  # the whole file, verified, loads
    assert held.size_bytes == big.size_bytes


# --- rollouts and the coordinator restart ------------------------------------------------------------
def _subset(source: Path, target: Path) -> str:
    """Another portfolio: the source's variants but its last."""
    original = PortfolioStore(source).manifest()
    store = PortfolioStore(target)
    kept = original.variants[:-1]
    for entry in kept:
        store.put_variant(PortfolioStore(source).variant_path(entry.variant_id).read_bytes())
        if entry.onnx_id:  # the cloud checks every file of a member before it deploys it
            store.put_onnx(PortfolioStore(source).onnx_path(entry.onnx_id).read_bytes())
    store.write_manifest(
        dataclasses.replace(original, variants=kept, portfolio_id=portfolio_id([v.variant_id for v in kept]))
    )
    return store.manifest().portfolio_id


class Fleet:
    def __init__(self, address: str, transport: Transport, client: Transport):
        self.address, self.transport, self.client = address, transport, client  # client: Predicts at edges

    def stub(self):
        return operator_client.coordinator_stub(self.address, self.transport)

    def edges(self) -> dict:
        fleet = operator_client.fleet(self.stub())
        return {e.edge: e for e in fleet.edges}

    def holding(self, edges, portfolio: str) -> bool:
        known = self.edges()
        return all(e in known and known[e].reported_portfolio_id == portfolio for e in edges)

    def listing(self):
        """The listing the cloud serves now (the operator may list too)."""
        stub = portfolio_pb2_grpc.PortfolioServiceStub(self.transport.channel(self.address))
        return stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=10)

    def rollout(self, rollout_id: int):
        rollouts = self.stub().ListRollouts(coordinator_pb2.ListRolloutsRequest(), timeout=10).rollouts
        return next(r for r in rollouts if r.id == rollout_id)


def _load(address: str, transport: Transport, good: bool, stop: threading.Event) -> None:
    """Requests at one edge until stopped: valid batches, or tensors of the wrong shape (errors)."""
    stub = inference_pb2_grpc.InferenceServiceStub(transport.channel(address))
    pixels = np.zeros((2, 1, 28, 28) if good else (2, 3, 5, 5), np.uint8)
    while not stop.is_set():
        try:
            stub.Predict(inference_pb2.PredictRequest(input=to_proto(pixels)), timeout=10)
        except grpc.RpcError:
            pass
        time.sleep(0.02)


def _judged_under_load(fleet: Fleet, rollout_id: int, edge_address: str, good: bool):
    stop = threading.Event()
    load = threading.Thread(target=_load, args=(edge_address, fleet.client, good, stop), daemon=True)
    load.start()
    try:
        return wait_for(
            lambda: (r := fleet.rollout(rollout_id)).state != "canary" and r,
            120,
            f"rollout {rollout_id} judged",
            interval_s=0.5,
        )
    finally:
        stop.set()
        load.join(15)


def _requests_between(db: Path, edge: str, start: float, end: float) -> int:
    """Requests in the telemetry windows the coordinator stored for `edge` that closed in (start, end)."""
    with sqlite3.connect(db) as connection:
        return (
            connection.execute(
                "SELECT SUM(requests) FROM windows WHERE edge = ? AND timestamp > ? AND timestamp < ?",
                (edge, start, end),
            ).fetchone()[0]
            or 0
        )


def _accepted(run: Path) -> dict[str, int]:
    """The newest listing version each edge accepted, as its cache holds it."""
    return {name: load_accepted(run / "cache" / name / STATE_NAME).version for name in ("edge-1", "edge-2")}


def _cli(*args) -> str:
    result = subprocess.run([PRUNEFLEET, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_canary_rollouts_roll_back_on_their_own_and_by_hand_and_survive_a_coordinator_restart(
    small_portfolio, keys, tmp_path
):
    first = PortfolioStore(small_portfolio).manifest().portfolio_id
    second = _subset(small_portfolio, tmp_path / "second")
    port = free_port("127.0.0.1")
    cloud = _cloud(small_portfolio, tmp_path, keys, port)
    children = [cloud]
    fleet = Fleet(f"localhost:{port}", Transport.load(keys["operator"], token=True), Transport.load(keys["client"]))
    operator_flags = ["--cloud", fleet.address, "--certs", str(keys["operator"])]
    try:
        for name in ("edge-1", "edge-2"):
            args = commands.edge_args(
                fleet.address,
                name,
                cache=tmp_path / "cache" / name,
                certs=certs.issue_holder(keys["cloud"].parent, "edge", name),
                batch=2,
            )
            children.append(processes.start(name, args, tmp_path / "logs"))
        edge_1 = children[1].address
        _cli("policy", "set", "--slo-ms", "10000", "--up-windows", "1", *operator_flags)
        fleet.stub().SetPolicy(
            coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=10_000, window_s=0.3)), timeout=10
        )
        wait_for(lambda: fleet.holding(["edge-1", "edge-2"], first), 60, "both edges on the first portfolio", 0.5)

        # a healthy canary: promoted to the other edge (the store uploaded: this cloud has no --portfolio-root)
        out = _cli(
            "deploy",
            str(tmp_path / "second"),
            "--canaries",
            "edge-1",
            "--min-windows",
            "3",
            "--adopt-timeout-s",
            "90",
            *operator_flags,
        )
        assert f"uploaded portfolio {second} " in out and "rollout 1 " in out and "canary edge-1" in out
        wait_for(lambda: fleet.holding(["edge-1"], second), 60, "the canary on the new portfolio", 0.5)
        assert fleet.edges()["edge-2"].reported_portfolio_id == first  # the rest wait for the verdict
        done = _judged_under_load(fleet, 1, edge_1, good=True)
        assert done.state == "complete", done.reason
        wait_for(lambda: fleet.holding(["edge-1", "edge-2"], second), 60, "the promotion", 0.5)
        rows = [line for line in _cli("fleet", "status", *operator_flags).splitlines() if line.startswith("edge-")]
        assert len(rows) == 2 and all(f" {second} " in row and "->" not in row for row in rows)  # desired == reported

        # an unhealthy canary: rolled back on its own
        again = fleet.stub().Deploy(
            coordinator_pb2.DeployRequest(
                portfolio=first, canaries="edge-1", thresholds=coordinator_pb2.RolloutThresholds(min_windows=3)
            ),
            timeout=30,
        )
        wait_for(lambda: fleet.holding(["edge-1"], first), 60, "the canary back on the first portfolio", 0.5)
        failed = _judged_under_load(fleet, again.rollout.id, edge_1, good=False)
        assert failed.state == "rolled_back" and "error rate" in failed.reason
        wait_for(lambda: fleet.holding(["edge-1", "edge-2"], second), 60, "the automatic rollback", 0.5)

        # by hand: the first rollout
        assert "rolled_back" in _cli("rollback", "--rollout", "1", "--reason", "by hand", *operator_flags)
        wait_for(lambda: fleet.holding(["edge-1", "edge-2"], first), 60, "the manual rollback", 0.5)
        # every deploy, promotion and rollback was a new listing version, and each edge took the newest
        version = fleet.listing().version
        assert version >= 6 and _accepted(tmp_path) == {"edge-1": version, "edge-2": version}
        before = (
            fleet.edges(),
            fleet.stub().GetFleet(coordinator_pb2.GetFleetRequest(), timeout=10),
            fleet.stub().ListEvents(coordinator_pb2.ListEventsRequest(), timeout=10).events,
            fleet.stub().ListRollouts(coordinator_pb2.ListRolloutsRequest(), timeout=10).rollouts,
        )

        # the coordinator dies and comes back: the edges keep serving meanwhile, and nothing is lost
        cloud.process.send_signal(signal.SIGKILL)
        cloud.process.wait(10)
        down_at = time.time()
        predict = inference_pb2_grpc.InferenceServiceStub(fleet.client.channel(edge_1)).Predict
        for _ in range(10):
            reply = predict(
                inference_pb2.PredictRequest(input=to_proto(np.zeros((2, 1, 28, 28), np.uint8))), timeout=10
            )
            assert reply.output.shape == [2, 10]
            time.sleep(0.1)
        time.sleep(1.0)
        up_at = time.time()
        children[0] = cloud = _cloud(small_portfolio, tmp_path, keys, port, "cloud-again")
        edges, fleet_view, events, rollouts = before
        after = fleet.stub().GetFleet(coordinator_pb2.GetFleetRequest(), timeout=10)
        assert after.policy == fleet_view.policy and after.portfolio_id == fleet_view.portfolio_id == first
        assert {e.edge: (e.desired_portfolio_id, e.registered_at) for e in after.edges} == {
            e.edge: (e.desired_portfolio_id, e.registered_at) for e in edges.values()
        }
        later = fleet.stub().ListEvents(coordinator_pb2.ListEventsRequest(), timeout=10).events
        assert list(later)[: len(events)] == list(events)
        assert list(fleet.stub().ListRollouts(coordinator_pb2.ListRolloutsRequest(), timeout=10).rollouts) == list(
            rollouts
        )
        wait_for(lambda: all(e.connected for e in fleet.edges().values()), 60, "the edges back on the link", 0.5)
        # the restarted cloud issues a new version, which each edge takes: nothing refused
        again = fleet.listing().version
        assert again > version
        wait_for(lambda: _accepted(tmp_path) == {"edge-1": again, "edge-2": again}, 30, "the new listing held", 0.5)
        assert not any("listing refused" in (tmp_path / "logs" / f"{e}.log").read_text() for e in ("edge-1", "edge-2"))
        assert (
            wait_for(
                lambda: _requests_between(tmp_path / "fleet.sqlite", "edge-1", down_at, up_at),
                30,
                "the windows buffered during the outage",
                0.5,
            )
            >= 10
        )

        # an edge that goes away is shown stale, never forgotten
        children[2].stop()
        rows = [line for line in _cli("fleet", "status", *operator_flags).splitlines() if line.startswith("edge-2")]
        assert len(rows) == 1 and " stale " in rows[0]
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
