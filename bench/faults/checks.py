"""What the fault scenarios measure: client load and its answers, corrupt loads, lost data, convergence.

Load        a closed-loop client per edge (mutual TLS, straight to the edge) that records every
            request: when it ended, its status, the variant that answered and whether the answer
            equals what that variant's file computes (reference logits from the cloud's copy of the
            file, run through the edge's own runtime code here)
audit_edge  every file the edge's cache holds under a variant id hashes to that id; every variant
            the edge's metrics say it loaded is such a verified file of a known portfolio
answered    requests the coordinator's stored telemetry windows say an edge answered since a time
            (read from the fleet database), to compare with what the clients saw answered
converged   every edge connected, holding its desired portfolio and applying the desired policy
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from cloud.build.store import PortfolioStore
from common import variant
from common.files import sha256_file
from common.wire import from_proto, to_proto
from edge.runtime import Runtime, RuntimeConfig
from edge.variants import VariantInfo, loaded
from protos import inference_pb2, inference_pb2_grpc

LOADED = re.compile(r'^prunefleet_edge_variant_load_seconds\{[^}]*variant="([0-9a-f]+)"', re.M)


def references(stores: list[Path], images: np.ndarray) -> dict[str, np.ndarray]:
    """The logits each variant of these stores gives for `images`, computed as an edge computes them."""
    out = {}
    for root in stores:
        store = PortfolioStore(root)
        for entry in store.manifest().variants:
            if entry.variant_id in out:
                continue
            held = variant.load(store.variant_path(entry.variant_id), expected_sha256=entry.variant_id)
            runtime = Runtime(RuntimeConfig())
            runtime.add(
                loaded(
                    VariantInfo(entry.variant_id, entry.name, entry.accuracy, entry.size_bytes, entry.params),
                    held.spec,
                    held.model,
                )
            )
            runtime.switch(entry.variant_id)
            out[entry.variant_id] = runtime.predict(images)[0]
    return out


@dataclass(frozen=True)
class Outcome:
    at: float  # when the request ended (unix seconds)
    edge: str
    code: str  # "OK" or the gRPC status name
    variant_id: str
    correct: bool  # the answer equals its variant's reference (False for failures)


class Load:
    """Closed-loop requests at every edge, `interval_s` apart per edge, while resumed."""

    def __init__(
        self, transport, edges: dict[str, str], images: np.ndarray, reference: dict[str, np.ndarray], interval_s: float
    ):
        self._reference, self._interval_s = reference, interval_s
        self._request = inference_pb2.PredictRequest(input=to_proto(images))
        self._running, self._stopping = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._threads = [
            threading.Thread(target=self._client, args=(name, transport.channel(address)), daemon=True)
            for name, address in edges.items()
        ]
        for thread in self._threads:
            thread.start()

    def resume(self) -> float:
        self._running.set()
        return time.time()

    def pause(self) -> float:
        self._running.clear()
        time.sleep(self._interval_s + 0.2)  # requests in flight end
        return time.time()

    def close(self) -> None:
        self._stopping.set()
        self._running.set()
        for thread in self._threads:
            thread.join(30)

    def _client(self, edge: str, channel) -> None:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while not self._stopping.is_set():
            self._running.wait()
            if self._stopping.is_set():
                return
            try:
                reply = stub.Predict(self._request, timeout=10)
                expected = self._reference.get(reply.variant_id)
                correct = expected is not None and np.allclose(from_proto(reply.output), expected, rtol=1e-3, atol=1e-3)
                outcome = Outcome(time.time(), edge, "OK", reply.variant_id, bool(correct))
            except grpc.RpcError as err:
                outcome = Outcome(time.time(), edge, err.code().name, "", False)
            with self._lock:
                self.outcomes.append(outcome)
            time.sleep(self._interval_s)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.at <= end]


def audit_edge(cache: Path, metrics_address: str, known: set[str]) -> dict:
    """Corrupt files in the cache and loaded variants without a verified file of a known portfolio."""
    verified, corrupt = set(), []
    for path in sorted(cache.glob("*.safetensors")):
        if sha256_file(path) == path.stem:
            verified.add(path.stem)
        else:
            corrupt.append(path.stem)
    try:
        text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    except OSError as err:
        return {
            "cache_files": len(verified) + len(corrupt),
            "corrupt_files": corrupt,
            "loaded": [],
            "unverified_loads": [],
            "metrics_error": str(err),
        }
    loaded_short = sorted(set(LOADED.findall(text)))
    unverified = [
        short for short in loaded_short if not any(vid.startswith(short) and vid in known for vid in verified)
    ]
    return {
        "cache_files": len(verified) + len(corrupt),
        "corrupt_files": corrupt,
        "loaded": loaded_short,
        "unverified_loads": unverified,
    }


def answered(db: Path, edge: str, since: float) -> int:
    """Requests answered (requests - errors) in the windows `edge` reported that closed after `since`."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        row = connection.execute(
            "SELECT SUM(requests - errors) FROM windows WHERE edge = ? AND timestamp > ?", (edge, since)
        ).fetchone()
    return int(row[0] or 0)


def disk_state(db: Path) -> dict:
    """What the fleet database on disk holds, read while no cloud runs."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        edges = connection.execute("SELECT name, registered_at, desired_portfolio FROM edges").fetchall()
        rollouts = connection.execute("SELECT id, state FROM rollouts").fetchall()
        events = connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        policy = connection.execute("SELECT MAX(version) FROM policies").fetchone()[0]
    return {
        "edges": {n: (r, d) for n, r, d in edges},
        "rollouts": dict(rollouts),
        "events": events,
        "policy_version": policy,
    }


def rpc_state(cluster) -> dict:
    """The same, as the running coordinator reports it."""
    fleet = cluster.fleet()
    return {
        "edges": {e.edge: (e.registered_at, e.desired_portfolio_id) for e in fleet.edges},
        "rollouts": {r.id: r.state for r in cluster.rollouts()},
        "events": len(cluster.events()),
        "policy_version": fleet.policy.version,
    }


def state_lost(before: dict, after: dict) -> list[str]:
    """What `after` lacks of `before`: edges, their registration and desired portfolio, rollouts (a
    state may only move on from canary), switch events, the policy version."""
    lost = []
    for name, (registered, desired) in before["edges"].items():
        now = after["edges"].get(name)
        moved = any(before["rollouts"].get(i) != s for i, s in after["rollouts"].items())
        if now is None or abs(now[0] - registered) > 1e-6 or (now[1] != desired and not moved):
            lost.append(f"edge {name}: {now} was ({registered}, {desired})")
    for rollout_id, state in before["rollouts"].items():
        allowed = (state, "complete", "rolled_back") if state == "canary" else (state,)
        if after["rollouts"].get(rollout_id) not in allowed:
            lost.append(f"rollout {rollout_id}: {after['rollouts'].get(rollout_id)} was {state}")
    if after["events"] < before["events"]:
        lost.append(f"events: {after['events']} of {before['events']}")
    if (after["policy_version"] or 0) < (before["policy_version"] or 0):
        lost.append(f"policy version {after['policy_version']} was {before['policy_version']}")
    return lost


def converged(fleet, pins: dict[str, str] | None = None) -> bool:
    """Every edge connected, holding its desired portfolio, on the desired policy (and its pinned variant)."""
    pins = pins or {}
    return bool(fleet.edges) and all(
        e.connected
        and e.reported_portfolio_id == e.desired_portfolio_id
        and e.policy_version == e.desired_policy_version
        and (e.edge not in pins or e.telemetry.active_variant == pins[e.edge])
        for e in fleet.edges
    )


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25) -> float | None:
    """Seconds until `predicate()` held (errors count as not yet), or None past the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except (grpc.RpcError, OSError):
            pass
        time.sleep(interval_s)
    return None
