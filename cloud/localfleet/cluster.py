"""`prunefleet cluster up|status|down`: the docker-compose topology as local processes.

`up` starts the cloud, one edge agent per `--edge NAME=CPUS`, a load generator and, when its binary
is installed, Prometheus, each detached in its own session; it returns once every one is healthy.
They speak mutual TLS with certificates in DIR/certs (`cloud.localfleet.cluster_certs`): the cloud its
own, every edge its own naming it, the load generator a client's (Predicts carry no operator token), and
the operator commands the cluster runs or prints the operator's certificate and token. With `insecure`
every process speaks plaintext instead, and no certificates are made.
A CPU limit is mimicked by the edge's thread count and CPU affinity (`placement`). DIR/cluster.json
holds what `status` and `down` need: each process's pid, start time, ports and log file, and the
certificates' directory.

This module holds what the cluster is (its settings, CPU placement, ports and state) and the order it
comes up in; how each process is launched and awaited is `cloud.localfleet.cluster_start`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud.build.store import PortfolioStore
from cloud.localfleet import cluster_certs, cluster_start, detached
from cloud.localfleet.cluster_certs import ClusterCerts
from cloud.localfleet.detached import Proc
from common.errors import PrunefleetError
from common.files import atomic_write_json
from common.policy_contract import PolicyContractError, setting
from common.security import Transport

STATE = "cluster.json"


class ClusterError(PrunefleetError, RuntimeError):
    """The cluster cannot be brought up, or is not there."""


@dataclass(frozen=True)
class EdgeSpec:
    name: str
    cpus: float  # the CPU limit this edge mimics

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"edge name {self.name!r}: use letters, digits, '-', '_' and '.'")
        if not 0 < self.cpus <= 256:
            raise ValueError(f"edge {self.name}: cpus must be in (0, 256], got {self.cpus}")

    @classmethod
    def parse(cls, text: str) -> EdgeSpec:
        """NAME=CPUS, e.g. edge-1=0.5."""
        name, sep, cpus = text.partition("=")
        try:
            return cls(name.strip(), float(cpus) if sep else 1.0)
        except ValueError as err:
            raise ValueError(f"--edge {text!r}: expected NAME=CPUS ({err})") from None


DEFAULT_EDGES = (EdgeSpec("edge-1", 0.5), EdgeSpec("edge-2", 1.0), EdgeSpec("edge-3", 2.0))
Placement = tuple[tuple[int, ...], int]  # the CPUs an edge may run on, and its thread count


@dataclass(frozen=True)
class ClusterConfig:
    dir: Path
    portfolio: Path | None = None  # an existing portfolio; else one is built in DIR with the demo's settings
    data_dir: Path | None = None
    quick: bool = False  # build the demo's quick portfolio
    base_port: int = 51000  # cloud BASE, its metrics BASE+1, Prometheus BASE+2, edge i BASE+10+2i and +11+2i
    host: str = "127.0.0.1"
    edges: tuple[EdgeSpec, ...] = DEFAULT_EDGES
    clients: int = 2  # closed-loop clients per edge
    think_s: float = 0.0
    batch: int = 8
    slo_ms: float | None = None  # set as the policy's SLO once the cluster is up
    prometheus: str = "auto"  # "auto" (the binary on PATH, if any), "off", or the binary's path
    scrape_interval_s: float = 5.0
    timeout_s: float = 180.0  # per process, to become healthy
    insecure: bool = False  # plaintext gRPC and no certificates, instead of mutual TLS

    def __post_init__(self) -> None:
        if self.base_port != 0 and not 1024 <= self.base_port <= 65535 - 11 - 2 * len(self.edges):
            raise ValueError("base_port must be 0 (free ports) or leave room for every port above it")
        if not self.edges or len({e.name for e in self.edges}) != len(self.edges):
            raise ValueError("edges must be at least one, with unique names")
        if self.clients < 1 or self.think_s < 0 or self.batch < 1 or self.timeout_s <= 0:
            raise ValueError("clients and batch must be >= 1, think_s >= 0, timeout_s > 0")
        if self.slo_ms is not None and (found := setting("slo_ms").problem(self.slo_ms)):
            raise PolicyContractError(found)  # the edges start on it and the coordinator sets it: one range
        if not 0.1 <= self.scrape_interval_s <= 60:
            raise ValueError("scrape_interval_s must be in [0.1, 60]")


def placement(edges: Sequence[EdgeSpec], cpus: Sequence[int]) -> tuple[tuple[int, ...], list[Placement]]:
    """The shared CPUs, and per edge the CPUs it may run on and its thread count.

    The first CPU is shared by the cloud, the load generator and every edge limited to less than one
    CPU, which so gets a share of one CPU. An edge limited to N >= 1 CPUs gets round(N) CPUs of its own,
    taken in turn from the others, and one thread per CPU. On a machine with fewer CPUs the turns wrap
    around, so edges share CPUs and get fewer than round(N).
    """
    shared, rest = (cpus[0],), list(cpus[1:]) or list(cpus[:1])
    turn, placed = 0, []
    for edge in edges:
        if edge.cpus < 1:
            placed.append((shared, 1))
            continue
        n = max(1, round(edge.cpus))
        mine = tuple(sorted({rest[(turn + i) % len(rest)] for i in range(n)}))
        turn += n
        placed.append((mine, len(mine)))
    return shared, placed


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ports(config: ClusterConfig) -> tuple[int, int, int, list[tuple[int, int]]]:
    """Cloud, cloud metrics, Prometheus, and (gRPC, metrics) per edge; 0 lets a process pick."""
    b = config.base_port
    if b == 0:
        return 0, 0, free_port(config.host), [(0, 0)] * len(config.edges)
    return b, b + 1, b + 2, [(b + 10 + 2 * i, b + 11 + 2 * i) for i in range(len(config.edges))]


def prometheus_config(cloud_metrics: str, edge_metrics: Sequence[str], interval_s: float) -> str:
    """The same jobs as deploy/prometheus.yml, with this cluster's targets."""
    interval = f"{round(interval_s * 1000)}ms"
    edges = ", ".join(f'"{t}"' for t in edge_metrics)
    return (
        f"# Written by `prunefleet cluster up`: the cloud and every edge agent of this cluster.\n"
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\n"
        f"scrape_configs:\n"
        f'  - job_name: prunefleet-cloud\n    static_configs:\n      - targets: ["{cloud_metrics}"]\n'
        f"  - job_name: prunefleet-edge\n    static_configs:\n      - targets: [{edges}]\n"
    )


# --- state ----------------------------------------------------------------------------------------------
def read_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE).read_text())
    except FileNotFoundError:
        return None


def processes(state: dict) -> list[Proc]:
    return [Proc.from_json(p) for p in state["processes"]]


def certificates(state: dict) -> ClusterCerts | None:
    """The cluster's certificates (None for a plaintext cluster, or one started before it had them)."""
    return ClusterCerts(Path(state["certs"])) if state.get("certs") else None


def operator_transport(state: dict) -> Transport:
    """How operator commands reach the cluster's cloud: the operator's certificate and token (plaintext
    for a cluster started `insecure`)."""
    keys = certificates(state)
    return Transport.load(keys.operator, token=True) if keys else Transport.plaintext()


def operator_flags(state: dict) -> str:
    """The flags an operator command (`prunefleet fleet status --cloud ADDRESS ...`) needs for this cluster."""
    keys = certificates(state)
    return f"--certs {keys.operator}" if keys else "--insecure"


def _save(state: dict, procs: Sequence[Proc]) -> None:
    atomic_write_json(Path(state["dir"]) / STATE, {**state, "processes": [p.to_json() for p in procs]})


# --- up ---------------------------------------------------------------------------------------------------
def _portfolio(config: ClusterConfig) -> Path:
    if config.portfolio:
        PortfolioStore(config.portfolio).manifest()  # fails with the store's message when there is none
        return config.portfolio
    from cloud.build import portfolio
    from cloud.localfleet import demo

    build = demo.DemoConfig(out=config.dir, data_dir=config.data_dir, quick=config.quick).build_config()
    if not PortfolioStore(build.out).exists():
        print(f"building a portfolio of {build.model} (width {build.width}) in {build.out} ...", flush=True)
        portfolio.build(build)
    return build.out


def _fresh(config: ClusterConfig) -> None:
    """Refuse to start over a running cluster; forget a dead one (its logs are overwritten)."""
    state = read_state(config.dir)
    if state and any(detached.alive(p) for p in processes(state)):
        raise ClusterError(
            f"a cluster is running from {config.dir}; stop it first with 'prunefleet cluster down --dir {config.dir}'"
        )
    (config.dir / STATE).unlink(missing_ok=True)
    for path in config.dir.glob("fleet.sqlite*"):
        path.unlink()
    (config.dir / "load.jsonl").unlink(missing_ok=True)


def _start_all(config: ClusterConfig, store: Path, binary: str | None, state: dict, procs: list[Proc]) -> None:
    """Start the processes in order (cloud, edges, load, Prometheus), appending each to `procs` and
    saving the state after each step, so `down` finds whatever did start."""
    shared, placed = placement(config.edges, sorted(os.sched_getaffinity(0)))
    cloud_port, cloud_metrics_port, prometheus_port, edge_ports = _ports(config)
    keys = certificates(state)
    procs.append(cluster_start.start_cloud(config, store, (cloud_port, cloud_metrics_port), shared, keys))
    _save(state, procs)
    cloud = procs[0]
    procs.extend(cluster_start.start_edges(config, cloud.address, edge_ports, placed, keys))
    _save(state, procs)
    procs.append(cluster_start.start_load(config, cloud.address, shared, store, keys))
    _save(state, procs)
    if binary:
        edges = [p.metrics_address for p in procs if p.role == "edge"]
        scrape = prometheus_config(cloud.metrics_address, edges, config.scrape_interval_s)
        procs.append(cluster_start.start_prometheus(config, binary, prometheus_port, scrape))
        state["prometheus_url"] = f"http://{procs[-1].address}"
    if config.slo_ms:
        from cloud.admin import operator_client

        operator_client.set_policy(cloud.address, operator_transport(state), slo_ms=config.slo_ms)
    _save(state, procs)


def up(config: ClusterConfig) -> dict:
    """Start everything, wait until each process is healthy, and return the state (also in DIR/cluster.json).
    When any process fails to come up, the ones already started are stopped again."""
    config.dir.mkdir(parents=True, exist_ok=True)
    _fresh(config)
    store = _portfolio(config)
    binary = cluster_start.prometheus_binary(config.prometheus)
    if config.prometheus not in ("auto", "off") and not (binary and os.access(binary, os.X_OK)):
        raise ClusterError(f"--prometheus {config.prometheus}: not an executable")
    keys = None
    if not config.insecure:
        keys = cluster_certs.prepare(config.dir / "certs", [e.name for e in config.edges], config.host)
    state = {
        "dir": str(config.dir.resolve()),
        "started": time.time(),
        "portfolio": str(Path(store).resolve()),
        "prometheus_url": "",
        "certs": str(keys.root.resolve()) if keys else "",
    }
    procs: list[Proc] = []
    try:
        _start_all(config, store, binary, state, procs)
    except BaseException:
        detached.stop(procs[::-1], grace_s=5.0)
        (config.dir / STATE).unlink(missing_ok=True)
        raise
    return {**state, "processes": [p.to_json() for p in procs]}
