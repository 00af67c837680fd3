"""How each process of the local cluster (`cloud.localfleet.cluster`) is started and awaited.

Every process is detached (`cloud.localfleet.detached`) with its own log under DIR/logs, and counts as up
only once it says so: the cloud and the edges print their serving line (`processes.SERVING`), the load
generator the line that it drives load at every edge, and Prometheus answers its readiness endpoint.
An edge that does not come up takes the edges started with it down too; what to start where (ports,
CPUs, the order) is the cluster's decision, not this module's.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.localfleet import cluster_certs, commands, detached
from cloud.localfleet.cluster_certs import ClusterCerts
from cloud.localfleet.detached import DetachedError, Proc, Spawned
from cloud.localfleet.processes import SERVING
from common.files import atomic_write_bytes

if TYPE_CHECKING:
    from cloud.localfleet.cluster import ClusterConfig, Placement


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _up_serving(spawned: Spawned, role: str, config: ClusterConfig, **extra) -> Proc:
    match = detached.wait_for_line(spawned, SERVING, config.timeout_s)
    return Proc(
        spawned.name,
        role,
        spawned.process.pid,
        spawned.started,
        str(spawned.log),
        match.group(1),
        match.group(2) or "",
        affinity=spawned.affinity,
        **extra,
    )


def start_cloud(
    config: ClusterConfig, store: Path, ports: tuple[int, int], shared: Sequence[int], keys: ClusterCerts | None
) -> Proc:
    """The cloud process serving the portfolio in `store` on its (gRPC, metrics) `ports`, its fleet
    database in DIR; with `keys`, on the cloud's certificate, renewing edges' with the CA."""
    renewal = ["--ca", str(keys.ca), "--edge-hosts", *cluster_certs.edge_hosts(config.host)] if keys else []
    args = _python(
        *commands.cloud_args(
            store,
            db=config.dir / "fleet.sqlite",
            certs=keys.cloud if keys else None,
            port=ports[0],
            metrics_port=ports[1],
            host=config.host,
            extra=renewal,
        )
    )
    return _up_serving(
        detached.spawn("cloud", args, config.dir / "logs" / "cloud.log", affinity=shared), "cloud", config
    )


def _edge_args(
    config: ClusterConfig, cloud: str, name: str, ports: tuple[int, int], threads: int, keys: ClusterCerts | None
) -> list[str]:
    return _python(
        *commands.edge_args(
            cloud,
            name,
            cache=config.dir / "cache" / name,
            certs=keys.edge(name) if keys else None,
            port=ports[0],
            metrics_port=ports[1],
            threads=threads,
            batch=config.batch,
            host=config.host,
            extra=["--slo-ms", str(config.slo_ms)] if config.slo_ms else (),
        )
    )


def start_edges(
    config: ClusterConfig,
    cloud: str,
    ports: Sequence[tuple[int, int]],
    placed: Sequence[Placement],
    keys: ClusterCerts | None,
) -> list[Proc]:
    """Every edge of `config`, each on its (gRPC, metrics) ports and CPU placement and, with `keys`, its
    own certificate; all started before any is awaited, so they come up side by side."""
    spawned = []
    for edge, edge_ports, (affinity, threads) in zip(config.edges, ports, placed):
        args = _edge_args(config, cloud, edge.name, edge_ports, threads, keys)
        log = config.dir / "logs" / f"{edge.name}.log"
        env = {"OMP_NUM_THREADS": str(threads)}
        spawned.append((edge, threads, detached.spawn(edge.name, args, log, env=env, affinity=affinity)))
    try:
        return [_up_serving(s, "edge", config, cpus=edge.cpus, threads=threads) for edge, threads, s in spawned]
    except BaseException:
        for _, _, s in spawned:
            detached.abandon(s)
        raise


def load_args(config: ClusterConfig, cloud: str, store: Path, keys: ClusterCerts | None) -> list[str]:
    """`prunefleet cluster load` as the cluster runs it: the fleet read with the operator's certificate
    and token, Predicts sent with the client certificate `cluster_certs.LOAD_CLIENT` (no token)."""
    transport = ["--certs", str(keys.operator), "--client-certs", str(keys.client)] if keys else ["--insecure"]
    return _python(
        "cloud.cli",
        "cluster",
        "load",
        "--cloud",
        cloud,
        "--clients",
        str(config.clients),
        "--think-s",
        str(config.think_s),
        "--batch",
        str(config.batch),
        "--out",
        str(config.dir / "load.jsonl"),
        *transport,
        "--portfolio",
        str(store),
        *(["--data-dir", str(config.data_dir)] if config.data_dir else []),
    )


def start_load(
    config: ClusterConfig, cloud: str, shared: Sequence[int], store: Path, keys: ClusterCerts | None
) -> Proc:
    """The closed-loop load generator (`load_args`) sending inputs from the data the portfolio in
    `store` was built on, up once it drives every edge."""
    args = load_args(config, cloud, store, keys)
    spawned = detached.spawn("load", args, config.dir / "logs" / "load.log", affinity=shared)
    detached.wait_for_line(spawned, re.compile(rf"driving load at {len(config.edges)} edge"), config.timeout_s)
    return Proc("load", "load", spawned.process.pid, spawned.started, str(spawned.log), affinity=shared)


def prometheus_binary(choice: str) -> str | None:
    """The Prometheus binary `--prometheus` names: None for "off", the one on PATH (if any) for "auto"."""
    if choice == "off":
        return None
    return shutil.which("prometheus") if choice == "auto" else choice


def _wait_ready(spawned: Spawned, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if spawned.process.poll() is not None:
            raise DetachedError(
                f"prometheus exited with code {spawned.process.returncode}; log {spawned.log}:\n"
                f"{detached.tail(spawned.log)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise DetachedError(
        f"prometheus not ready within {timeout_s:.0f} s; log {spawned.log}:\n{detached.tail(spawned.log)}"
    )


def start_prometheus(config: ClusterConfig, binary: str, port: int, scrape_config: str) -> Proc:
    """Prometheus on `port` with `scrape_config` (written to DIR/prometheus.yml), up once it is ready."""
    path = config.dir / "prometheus.yml"
    atomic_write_bytes(path, scrape_config.encode())
    address = f"{config.host}:{port}"
    args = [
        binary,
        f"--config.file={path}",
        f"--storage.tsdb.path={config.dir / 'prometheus-data'}",
        f"--web.listen-address={address}",
        "--storage.tsdb.retention.time=2d",
    ]
    spawned = detached.spawn("prometheus", args, config.dir / "logs" / "prometheus.log")
    try:
        _wait_ready(spawned, f"http://{address}", config.timeout_s)
    except BaseException:
        detached.abandon(spawned)
        raise
    return Proc("prometheus", "prometheus", spawned.process.pid, spawned.started, str(spawned.log), address)
