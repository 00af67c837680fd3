"""`prunefleet demo`: the whole path on real data and real processes.

Trains a small CNN on Fashion-MNIST, builds a shifter portfolio, starts the cloud and two edge agents as
separate processes on loopback, sets an SLO from the edges' own profiles, drives a light-heavy-light
load and checks that every edge stepped down under the heavy phase and back up after it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path


from cloud import loadgen, operator, portfolio, processes, report, shifter
from cloud.train import TrainConfig
from common import datasets
from protos import coordinator_pb2

log = logging.getLogger(__name__)
EDGES = ("edge-a", "edge-b")
BATCH = 8


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    data_dir: Path | None = None
    quick: bool = False
    heavy_clients: int = 6

    def build_config(self) -> portfolio.BuildConfig:
        if self.quick:
            return portfolio.BuildConfig(
                out=self.out / "portfolio", model="vgg11", width=0.125, data_dir=self.data_dir, subset=2000,
                train=TrainConfig(epochs=1), shifter=shifter.ShifterConfig(levels=3, rate=0.7))
        return portfolio.BuildConfig(
            out=self.out / "portfolio", model="vgg11", width=0.25, data_dir=self.data_dir, subset=10000,
            train=TrainConfig(epochs=2), shifter=shifter.ShifterConfig(levels=4, rate=0.6))

    def phases(self) -> list[loadgen.Phase]:
        scale = 0.5 if self.quick else 1.0
        return [loadgen.Phase("light", 15 * scale, 1, think_s=0.05),
                loadgen.Phase("heavy", 40 * scale, self.heavy_clients),
                loadgen.Phase("light-again", 45 * scale, 1, think_s=0.05)]


def _wait_for_profiles(cloud: str, n_variants: int, timeout_s: float = 180.0) -> coordinator_pb2.GetFleetResponse:
    stub = operator.coordinator_stub(cloud)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fleet = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=operator.RPC_TIMEOUT_S)
        ready = [e for e in fleet.edges if e.connected and len(e.profiles) >= n_variants and e.telemetry.active_variant]
        if len(ready) == len(EDGES):
            return fleet
        time.sleep(0.5)
    raise TimeoutError(f"edges did not report profiles of all {n_variants} variants within {timeout_s:.0f} s")


def choose_slo_ms(fleet: coordinator_pb2.GetFleetResponse, clients: int) -> float:
    """Between the slowest and the fastest variant's latency under `clients` queued requests.

    A closed loop of `clients` requests on one inference slot waits about clients x service time; the
    geometric mean of that for the fastest and the slowest variant (the worst edge's profiles) breaks
    the SLO on the largest variant under heavy load and leaves room for it under light load.
    """
    slowest = max(max(p.p50_ms_batch for p in e.profiles) for e in fleet.edges)
    fastest = max(min(p.p50_ms_batch for p in e.profiles) for e in fleet.edges)
    return round(clients * math.sqrt(slowest * fastest), 1)


def _start_cluster(store: Path, run_dir: Path) -> list[processes.Child]:
    logs = run_dir / "logs"
    cloud = processes.start("cloud", ["cloud.cli", "cloud", "serve", "--store", str(store), "--port", "0",
                                      "--metrics-port", "0", "--db", str(run_dir / "fleet.sqlite")], logs)
    children = [cloud]
    for name in EDGES:
        children.append(processes.start(name, [
            "edge.cli", "run", "--cloud", cloud.address, "--name", name, "--port", "0", "--metrics-port", "0",
            "--cache", str(run_dir / "cache" / name), "--threads", "1", "--batch", str(BATCH)], logs))
    return children


def _drive(config: DemoConfig, children: list[processes.Child], n_variants: int) -> dict:
    cloud = children[0].address
    fleet = _wait_for_profiles(cloud, n_variants)
    slo_ms = choose_slo_ms(fleet, config.heavy_clients)
    policy = operator.set_policy(cloud, slo_ms=slo_ms, down_windows=2, up_windows=3, up_headroom=0.7,
                                 dwell_s=3.0, window_s=1.0)
    print(f"policy v{policy.version}: SLO p95 <= {slo_ms:.1f} ms per batch of {BATCH} (from the edges' own profiles)")
    test = datasets.load("fashion-mnist", config.data_dir).test
    images = test.images.numpy()[:2000]
    generator = loadgen.LoadGenerator({c.name: c.address for c in children[1:]}, images, BATCH)
    started = time.time()
    generator.run(config.phases(), on_phase=lambda p: print(
        f"phase {p.name}: {p.clients} client(s) per edge for {p.seconds:.0f} s", flush=True))
    time.sleep(1.5)  # let the last telemetry window and switch reports arrive
    events = operator.coordinator_stub(cloud).ListEvents(
        coordinator_pb2.ListEventsRequest(since=started - 60), timeout=operator.RPC_TIMEOUT_S).events
    return {"slo_ms": slo_ms, "started": started, "samples": generator.samples, "events": list(events),
            "names": operator.variant_names(cloud)}


def run(config: DemoConfig) -> int:
    run_dir = config.out
    build = config.build_config()
    print(f"building a shifter portfolio of {build.model} (width {build.width}) on Fashion-MNIST ...", flush=True)
    manifest = portfolio.build(build)
    print(operator.portfolio_table(manifest), flush=True)
    children = _start_cluster(build.out, run_dir)
    try:
        print("cloud on " + children[0].address + "; edges " +
              ", ".join(f"{c.name} on {c.address}" for c in children[1:]), flush=True)
        outcome = _drive(config, children, len(manifest.variants))
    finally:
        for child in reversed(children):
            child.stop()
    verdict = report.write(run_dir, manifest, outcome, config.phases(), EDGES)
    print(verdict.text)
    return 0 if verdict.ok else 1


