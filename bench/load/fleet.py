"""Load, for the reliability suite: a fleet reporting to one coordinator, one agent at saturation, and
memory over many switches, all against real processes on loopback with mutual TLS.

    fleet      `edges` simulated edges (`bench.load.fleet_sim`, in `procs` client processes) register with a
               real cloud process (`prunefleet cloud serve`), each holds one `Connect` stream and sends
               one telemetry window a second for `fleet_s` seconds. A window is dropped when the edge
               sent it and the coordinator's database does not hold it afterwards: the bench compares
               every (edge, timestamp) the edges sent with the rows in the `windows` table.
    predict    closed-loop Predict against one real agent (`bench.load.agent.saturate`).
    switches   RSS over `switches` switches in the edge runtime (`bench.probes.switches`).

`run(quick, data_dir, work)` returns the three parts and a `summary`. The portfolio is a small shifter
portfolio of VGG-11 trained on a Fashion-MNIST subset (built once, kept in `work`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.load import agent as agent_load
from bench.load.agent import Periodic, RssSampler
from bench.suites.policy_parts import build_portfolio
from cloud.admin import certs, operator_client
from cloud.build.store import PortfolioStore
from cloud.localfleet import commands, processes
from cloud.localfleet.inputs import portfolio_inputs
from common.security import Transport

log = logging.getLogger(__name__)
FULL = {
    "edges": 1000,
    "procs": 4,
    "ramp_s": 40.0,
    "fleet_s": 60,
    "predict_s": 60.0,
    "warmup_s": 5.0,
    "clients": 16,
    "agent_threads": 2,
    "switches": 10_000,
    "every": 100,
    "on_demand_switches": 1000,
}
QUICK = {
    "edges": 200,
    "procs": 2,
    "ramp_s": 15.0,
    "fleet_s": 15,
    "predict_s": 15.0,
    "warmup_s": 3.0,
    "clients": 16,
    "agent_threads": 2,
    "switches": 2000,
    "every": 50,
    "on_demand_switches": 100,
}
PORTFOLIO = {"width": 0.25, "subset": 2000, "epochs": 1, "levels": 3, "rate": 0.5, "rewind_iteration": 20}
PREFIX = "sim"
MB = 1 << 20


def start_cloud(store: Path, run_dir: Path, keys: dict) -> processes.Child:
    args = commands.cloud_args(store, db=run_dir / "fleet.sqlite", certs=keys["cloud"], metrics_port=0)
    return processes.start("cloud", args, run_dir / "logs")


def _connected(stub, prefix: str) -> int:
    fleet = operator_client.fleet(stub)
    return sum(e.connected for e in fleet.edges if e.edge.startswith(prefix + "-"))


def _query(db: Path, sql: str, prefix: str, timeout: float = 5.0) -> list:
    """Rows about the simulated edges (`prefix-*`), read-only (the coordinator writes in WAL mode)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
    try:
        return connection.execute(sql, (prefix + "-%",)).fetchall()
    finally:
        connection.close()


def _stored(db: Path, prefix: str) -> set[tuple[str, float]]:
    return set(_query(db, "SELECT edge, timestamp FROM windows WHERE edge LIKE ?", prefix))


class StoredCounter(Periodic):
    """Windows stored so far, counted in the coordinator's database every second (read-only, WAL)."""

    def __init__(self, db: Path, prefix: str):
        super().__init__(1.0)
        self._db, self._prefix = db, prefix
        self.samples: list[tuple[float, int]] = []  # (unix time, windows stored)
        self.errors: list[str] = []

    def sample(self) -> None:
        try:
            count = _query(self._db, "SELECT COUNT(*) FROM windows WHERE edge LIKE ?", self._prefix, timeout=10)[0][0]
            self.samples.append((time.time(), count))
        except sqlite3.Error as err:
            self.errors.append(str(err))

    def rate(self, start: float, end: float) -> float:
        """Windows stored per second between the first samples at or after `start` and `end`."""
        first = next(((t, n) for t, n in self.samples if t >= start), None)
        last = next(((t, n) for t, n in self.samples if t >= end), None)
        if first is None or last is None or last[0] <= first[0]:
            return 0.0
        return (last[1] - first[1]) / (last[0] - first[0])


def _simulators(cloud: processes.Child, keys: dict, run_dir: Path, plan: dict, start_at: float) -> list:
    per = -(-plan["edges"] // plan["procs"])
    children = []
    for p in range(plan["procs"]):
        first, count = p * per, min(per, plan["edges"] - p * per)
        out = run_dir / f"sim-{p}.json"
        with open(run_dir / "logs" / f"sim-{p}.log", "wb") as log_file:
            children.append(
                (
                    out,
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bench.load.fleet_sim",
                            "--cloud",
                            cloud.address,
                            "--certs-dir",
                            str(keys["cloud"].parent),
                            "--prefix",
                            PREFIX,
                            "--edges",
                            str(count),
                            "--first",
                            str(first),
                            "--fleet",
                            str(plan["edges"]),
                            "--start-at",
                            str(start_at),
                            "--ramp-s",
                            str(plan["ramp_s"]),
                            "--seconds",
                            str(plan["fleet_s"]),
                            "--out",
                            str(out),
                        ],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
    return children


def fleet(cloud: processes.Child, keys: dict, run_dir: Path, plan: dict) -> dict:
    """The simulated fleet against the running cloud; what was sent against what was stored."""
    stub = operator_client.coordinator_stub(cloud.address, Transport.load(keys["operator"], token=True))
    start_at = time.time() + plan["ramp_s"] + 3.0  # the client processes need a moment to start
    with RssSampler(cloud.process.pid) as sampler, StoredCounter(run_dir / "fleet.sqlite", PREFIX) as counter:
        children = _simulators(cloud, keys, run_dir, plan, start_at)
        time.sleep(max(0.0, start_at + 2.0 - time.time()))
        connected_at_start = _connected(stub, PREFIX)
        time.sleep(max(0.0, start_at + plan["fleet_s"] / 2 - time.time()))
        connected_midway = _connected(stub, PREFIX)
        for _, child in children:
            child.wait(plan["fleet_s"] + plan["ramp_s"] + 300)
        time.sleep(max(0.0, start_at + plan["fleet_s"] + 2.5 - time.time()))  # the counter's last samples
        _connected(stub, PREFIX)  # GetFleet waits for every report queued before it to be stored
    edges: dict = {}
    for out, child in children:
        if child.returncode != 0:
            raise RuntimeError(f"a fleet simulator failed ({child.returncode}); see {run_dir / 'logs'}")
        edges.update(json.loads(out.read_text()))
    sent = {(name, t) for name, edge in edges.items() for t in edge["sent"]}
    stored = _stored(run_dir / "fleet.sqlite", PREFIX)
    errors: dict[str, int] = {}
    for edge in edges.values():
        for code in edge["errors"]:
            errors[code] = errors.get(code, 0) + 1
    end = start_at + plan["fleet_s"]
    by_end = next((n for t, n in counter.samples if t >= end + 1.0), 0)  # a window's tick and a second
    during = [s for s in sampler.samples if s[0] > 0]
    return {
        "edges": plan["edges"],
        "client_processes": plan["procs"],
        "seconds": plan["fleet_s"],
        "sent": len(sent),
        "stored": len(stored & sent),
        "dropped": len(sent - stored),
        "unexpected_rows": len(stored - sent),
        "reports_per_s": counter.rate(start_at + 1.0, end),
        "stored_within_1s_of_end": by_end,
        "stored_counts": counter.samples,
        "count_errors": counter.errors[:10],
        "edges_connected": sum(bool(e["connected_at"]) for e in edges.values()),
        "connected_at_start": connected_at_start,
        "connected_midway": connected_midway,
        "stream_errors": errors,
        "cloud_rss_max_bytes": max((s[1] for s in during), default=0),
        "cloud_cpu_percent_mean": sum(s[2] for s in during) / max(1, len(during)),
        "cloud_samples": [[t, rss, cpu] for t, rss, cpu in sampler.samples],
    }


def prepare(work: Path, data_dir) -> tuple[PortfolioStore, dict]:
    store = build_portfolio(PORTFOLIO, work, data_dir)
    keys = certs.init(work / "certs", force=True)
    return store, keys


def measure(store: PortfolioStore, keys: dict, run_dir: Path, plan: dict, data_dir) -> dict:
    """The three loads with this plan; `plan` as FULL or QUICK."""
    run_dir.mkdir(parents=True, exist_ok=True)
    images = portfolio_inputs(store, 512, data_dir=data_dir)
    cloud = start_cloud(store.root, run_dir, keys)
    try:
        reports = fleet(cloud, keys, run_dir, plan)
        predict = agent_load.saturate(cloud.address, keys, run_dir, images, plan)
    finally:
        cloud.stop()
    files = [store.variant_path(v.variant_id) for v in store.manifest().variants]
    resident = agent_load.switch_memory(files, plan["switches"], plan["every"], data_dir, portfolio=store.root)
    largest = max(v.size_bytes for v in store.manifest().variants)  # room for one: every switch loads
    on_demand = agent_load.switch_memory(
        files,
        plan["on_demand_switches"],
        max(1, plan["every"] // 5),
        data_dir,
        budget_bytes=largest,
        portfolio=store.root,
    )
    return {"fleet": reports, "predict": predict, "switches": resident, "switches_on_demand": on_demand}


def summary(result: dict) -> dict:
    fleet_part, predict, switches = result["fleet"], result["predict"], result["switches"]
    return {
        "edges": fleet_part["edges"],
        "reports_per_s": fleet_part["reports_per_s"],
        "reports_dropped": fleet_part["dropped"],
        "edges_connected": fleet_part["edges_connected"],
        "predict_per_s": predict["per_s"],
        "predict_p50_ms": predict["p50_ms"],
        "predict_p99_ms": predict["p99_ms"],
        "predict_failed": predict["failed"],
        "predict_resource_exhausted": predict["resource_exhausted"],
        "agent_rss_growth_mb_predict": (predict["rss_after_bytes"] - predict["rss_before_bytes"]) / MB,
        "switches": switches["switches"],
        "switch_us_p99": switches["switch_us_p99"],
        "rss_growth_mb_10k_switches": switches["growth_after_warmup_bytes"] / MB,  # over `switches` (10k in full)
        "rss_growth_mb_on_demand_switches": result["switches_on_demand"]["growth_after_warmup_bytes"] / MB,
    }


def run(quick: bool, data_dir, work: Path) -> dict:
    plan = QUICK if quick else FULL
    work = Path(work or "runs/fleet_load.work")
    work.mkdir(parents=True, exist_ok=True)
    store, keys = prepare(work, data_dir)
    result = measure(store, keys, work / f"run-{time.strftime('%Y%m%d-%H%M%S')}", plan, data_dir)
    result["plan"] = plan
    result["summary"] = summary(result)
    return result
