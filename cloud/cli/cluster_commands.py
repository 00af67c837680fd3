"""`prunefleet cluster up|status|down|report` and `prunefleet cluster load` (the cluster's load generator)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

from cloud.admin import operator_client
from cloud.admin.operator_client import table
from cloud.build.store import StoreError
from cloud.localfleet import cluster, cluster_report, detached
from cloud.localfleet.cluster import ClusterConfig, ClusterError, EdgeSpec
from cloud.localfleet.detached import DetachedError
from common import security

DEFAULT_DIR = Path("runs/cluster")


def _edge(text: str) -> EdgeSpec:
    try:
        return EdgeSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fixed_edge(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not (name and sep and ":" in address):
        raise argparse.ArgumentTypeError(f"--edge {text!r}: expected NAME=HOST:PORT")
    return name, address


def _add_up(actions) -> None:
    up = actions.add_parser("up", help="start the cluster detached; return once every process is healthy")
    up.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state, logs, reports (default runs/cluster)")
    up.add_argument("--portfolio", type=Path, default=None, help="an existing portfolio (default: build one in DIR)")
    up.add_argument("--data-dir", type=Path, default=None)
    up.add_argument("--quick", action="store_true", help="build the demo's quick portfolio instead of its full one")
    up.add_argument(
        "--base-port",
        type=int,
        default=51000,
        help="cloud BASE, its metrics BASE+1, Prometheus BASE+2, edge i BASE+10+2i and BASE+11+2i; 0 picks free ports",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument(
        "--edge",
        dest="edges",
        action="append",
        type=_edge,
        metavar="NAME=CPUS",
        help="an edge and the CPUs it mimics; repeat (default edge-1=0.5 edge-2=1 edge-3=2)",
    )
    up.add_argument("--clients", type=int, default=2, help="closed-loop load clients per edge")
    up.add_argument("--think-s", type=float, default=0.0, help="pause between a load client's requests")
    up.add_argument("--batch", type=int, default=8)
    up.add_argument("--slo-ms", type=float, default=None, help="set the policy's SLO once up")
    up.add_argument("--prometheus", default="auto", help="auto (the binary on PATH, if any), off, or a PATH")
    up.add_argument("--scrape-interval-s", type=float, default=5.0)
    up.add_argument("--timeout-s", type=float, default=180.0, help="per process, to become healthy")
    up.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, no certificates (the monitoring tests' cluster uses it); by default every process "
        "speaks mutual TLS with certificates in DIR/certs, each edge its own",
    )


def add_parser(top, environ=None) -> None:
    """Register `cluster` on the `prunefleet` subcommands."""
    actions = top.add_parser(
        "cluster", help="a local cluster as processes: cloud, edges, load, Prometheus"
    ).add_subparsers(dest="action", required=True)
    _add_up(actions)
    for name, text in (
        ("status", "each process alive or dead, and the coordinator's fleet view"),
        ("down", "write the report, then stop every process (SIGTERM, SIGKILL after a grace)"),
        ("report", "write DIR/report: report.json, latency.png, frontier.png"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--dir", type=Path, default=DEFAULT_DIR)
        if name == "down":
            action.add_argument("--grace-s", type=float, default=10.0)
            action.add_argument("--no-report", dest="report", action="store_false")
    load = actions.add_parser("load", help="closed-loop load at every edge the coordinator knows (runs until stopped)")
    load.add_argument("--cloud", required=True, metavar="HOST:PORT")
    load.add_argument("--clients", type=int, default=2)
    load.add_argument("--think-s", type=float, default=0.0)
    load.add_argument("--batch", type=int, default=8)
    load.add_argument("--round-s", type=float, default=2.0)
    load.add_argument("--out", type=Path, default=None, help="append per-second measurements here (JSON lines)")
    load.add_argument("--data-dir", type=Path, default=None)
    load.add_argument(
        "--portfolio",
        type=Path,
        default=None,
        help="the served portfolio's store: inputs come from the data it was built on "
        "(default: random inputs of the served portfolio's shape)",
    )
    load.add_argument(
        "--edge",
        dest="edges",
        action="append",
        default=[],
        type=_fixed_edge,
        metavar="NAME=HOST:PORT",
        help="load this edge (repeat) instead of the ones the coordinator lists; then --certs may be a "
        "client's directory and no operator token is read",
    )
    security.add_arguments(load, token=True, environ=environ)
    load.add_argument(
        "--client-certs",
        type=Path,
        default=None,
        metavar="DIR",
        help="the client certificate Predicts go with (default: DIR/../clients/default of --certs); "
        "the operator token never goes to an edge",
    )


def _load_client(args) -> security.Transport | None:
    """The transport of `cluster load`'s Predicts: a client certificate (None in plaintext)."""
    if args.insecure:
        return None
    if args.edges and not args.client_certs:
        return None  # --certs is the client's: the coordinator is not asked
    return security.Transport.load(args.client_certs or Path(args.certs).parent / "clients" / "default")


def _up(args) -> int:
    config = ClusterConfig(
        dir=args.dir,
        portfolio=args.portfolio,
        data_dir=args.data_dir,
        quick=args.quick,
        base_port=args.base_port,
        host=args.host,
        edges=tuple(args.edges or cluster.DEFAULT_EDGES),
        clients=args.clients,
        think_s=args.think_s,
        batch=args.batch,
        slo_ms=args.slo_ms,
        prometheus=args.prometheus,
        scrape_interval_s=args.scrape_interval_s,
        timeout_s=args.timeout_s,
        insecure=args.insecure,
    )
    state = cluster.up(config)
    print(status_text(state)[0])
    if not state["prometheus_url"] and config.prometheus == "auto":
        print("prometheus is not installed ('apt-get install prometheus'); the cluster runs without it")
    print(f"stop it with: prunefleet cluster down --dir {args.dir}")
    return 0


def status_text(state: dict) -> tuple[str, bool]:
    """The processes (alive or dead) and the coordinator's fleet view; True when all are alive."""
    procs = cluster.processes(state)
    alive = {p.name: detached.alive(p) for p in procs}
    rows = [
        (
            p.name,
            p.role,
            p.pid,
            "alive" if alive[p.name] else "DEAD",
            p.address or "-",
            p.metrics_address or "-",
            f"{p.cpus:g}" if p.cpus else "-",
            ",".join(map(str, p.affinity)) or "-",
            p.threads or "-",
            p.log,
        )
        for p in procs
    ]
    up_for = time.time() - state["started"]
    lines = [
        f"cluster in {state['dir']}, up {up_for:.0f} s, portfolio {state['portfolio']}, "
        + (f"mutual TLS with certificates in {state['certs']}" if state.get("certs") else "plaintext (--insecure)"),
        table(("process", "role", "pid", "state", "address", "metrics", "cpus", "affinity", "threads", "log"), rows),
    ]
    cloud = next((p for p in procs if p.role == "cloud"), None)
    if cloud and alive[cloud.name]:
        try:
            lines += ["", operator_client.fleet_status(cloud.address, cluster.operator_transport(state))]
        except grpc.RpcError as err:
            lines.append(f"coordinator at {cloud.address} did not answer: {err.code().name}")
        except security.SecurityError as err:
            lines.append(f"cannot call the coordinator at {cloud.address}: {err}")
        lines.append(
            f"operate it with: prunefleet fleet status --cloud {cloud.address} {cluster.operator_flags(state)}"
        )
    if state["prometheus_url"]:
        lines.append(
            f"Prometheus: {state['prometheus_url']} (targets: {state['prometheus_url']}/targets); "
            "Grafana dashboard: deploy/grafana/dashboards/prunefleet.json"
        )
    return "\n".join(lines), all(alive.values())


def _report(state: dict) -> str:
    try:
        return cluster_report.write(state, cluster.processes(state))[1]
    except (grpc.RpcError, OSError, StoreError, ValueError, StopIteration) as err:
        return f"no report: {err}"


def down(directory: Path, grace_s: float, report: bool) -> str:
    state = cluster.read_state(directory)
    if state is None:
        return f"no cluster in {directory}"
    procs = cluster.processes(state)
    lines = [_report(state)] if report else []
    outcome = detached.stop([p for p in procs if p.role == "load"], grace_s)
    outcome.update(detached.stop([p for p in procs if p.role != "load"][::-1], grace_s))
    (directory / cluster.STATE).unlink(missing_ok=True)
    lines.append(table(("process", "pid", "outcome"), [(p.name, p.pid, outcome[p.name]) for p in procs]))
    lines.append(f"logs kept in {directory / 'logs'}")
    return "\n".join(lines)


def main(args) -> int:
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "load":
            from cloud.localfleet import cluster_load  # reads the portfolio's images with torch: only here

            return cluster_load.main(
                cluster_load.LoadConfig(
                    cloud=args.cloud,
                    out=args.out,
                    clients=args.clients,
                    think_s=args.think_s,
                    batch=args.batch,
                    round_s=args.round_s,
                    data_dir=args.data_dir,
                    portfolio=args.portfolio,
                    edges=tuple(args.edges),
                ),
                security.from_arguments(args, token=not args.edges),
                _load_client(args),
            )
        if args.action == "down":
            print(down(args.dir, args.grace_s, args.report))
            return 0
        state = cluster.read_state(args.dir)
        if state is None:
            raise ClusterError(f"no cluster in {args.dir}; start one with 'prunefleet cluster up --dir {args.dir}'")
        if args.action == "report":
            print(_report(state))
            return 0
        text, ok = status_text(state)
        print(text)
        return 0 if ok else 1
    except (ClusterError, DetachedError) as err:
        print(f"prunefleet: error: {err}", file=sys.stderr)
        return 1
