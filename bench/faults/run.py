"""Faults (part of `prunefleet bench reliability`): break a running fleet and check what it promises.

One cloud and two edges run as real processes over mutual TLS; each edge reaches the cloud through a
TCP proxy that stands for its network link (`bench.net.tcp_proxy`). Clients load both edges all along,
straight to the edges, and check every answer against what the answering variant's file computes.
Faults, in order (`bench.faults.scenarios`):

    cloud_kill_during_transfer      SIGKILL the cloud while the canary edge downloads a new portfolio
                                    over a slow link (a file of several chunks, cut after the first)
    cloud_kill_during_rollout       SIGKILL the cloud while a rollout's canary is being judged
    edge_kill_during_download       SIGKILL an edge in the middle of a download; start it again
    edge_kill_during_switch         SIGKILL an edge while it is pinned back and forth (with a memory
                                    budget, so each switch loads a variant from its cache); start it
                                    again and pin it
    coordinator_restart_under_load  stop the cloud and start it again while the edges serve
    network_cut                     cut an edge's link to the cloud (`cut_s`: 10 s quick, 60 s full)
                                    and change the policy meanwhile

After each one, per fault: requests sent and failed (a killed edge's requests are not counted from
its kill until it answers again after its restart), corrupt loads (a cached file that does not hash
to its id, a loaded variant without such a verified file, an answer that differs from its variant's),
data lost (state the coordinator had before a kill and lacks after it, requests the edges answered
that no stored telemetry window counts, switch events a killed edge had logged but never delivered)
and the time from recovery until every edge holds its desired portfolio and policy (`converge_s`).
A fault is survived when all of its promises held: no failed request, nothing corrupt, no promised
data lost, converged within `converge_s`, and the fault's own checks (see `bench.faults.scenarios`).
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.faults.checks import (
    Load,
    answered,
    audit_edge,
    converged,
    references,
    wait_until,
)
from bench.faults.cluster import Cluster, base_portfolio, payload_portfolio
from bench.faults.scenarios import SCENARIOS
from cloud.localfleet.inputs import portfolio_inputs
from common.files import short_id

log = logging.getLogger(__name__)
QUICK = {
    "width": 0.125,
    "subset": 2000,
    "levels": 2,
    "payload_width": 0.25,
    "throttle_bytes_s": 1_000_000,
    "cut_s": 10.0,
    "interval_s": 0.05,
    "window_s": 0.5,
    "min_windows": 4,
    "judge_windows": 10,
    "flip_s": 0.6,
    "kill_pause_s": 1.0,
    "converge_s": 90.0,
    "scenarios": tuple(SCENARIOS),
}
FULL = {**QUICK, "cut_s": 60.0, "interval_s": 0.02, "converge_s": 120.0}
EDGES = {"edge-1": ("--memory-budget-mib", "1"), "edge-2": ()}
SLO_MS = 10_000.0  # the faults judge availability, not latency: canaries pass on errors alone


@dataclass
class Context:
    cluster: Cluster
    plan: dict
    base: Path
    payloads: list[tuple[Path, str]]
    load: Load
    known: set[str]


def _down(ctx: Context, killed: dict[str, tuple[float, float]], end: float) -> dict[str, tuple[float, float]]:
    """Per killed edge: from its kill until its first answer after it was started again (or the end).

    A request can still be answered between the moment taken as the kill and the process's death, so
    only an answer after the restart marks the edge as back."""
    spans = {}
    for edge, (at, restarted_at) in killed.items():
        back = [o.at for o in ctx.load.between(restarted_at, end) if o.edge == edge and o.code == "OK"]
        spans[edge] = (at, min(back) if back else end)
    return spans


def _telemetry_lost(ctx: Context, start: float, outcomes, down: dict) -> dict[str, int]:
    """Requests each edge answered minus those its stored windows count, waiting for late windows of the
    edges whose telemetry is promised (a killed edge loses the windows it had not sent, by design, so
    waiting for those would only run out the wait)."""

    def lost() -> dict[str, int]:
        return {
            edge: sum(o.code == "OK" for o in outcomes if o.edge == edge) - answered(ctx.cluster.db, edge, start)
            for edge in ctx.cluster.edges
        }

    wait_until(lambda: not any(n for edge, n in lost().items() if edge not in down), 15, 0.5)
    return lost()


def _evaluate(ctx: Context, seen: dict, start: float, end: float) -> dict:
    outcomes = ctx.load.between(start, end)
    down = _down(ctx, seen["killed"], end)
    excused = [o for o in outcomes if o.edge in down and down[o.edge][0] <= o.at < down[o.edge][1]]
    failed = [o for o in outcomes if o.code != "OK" and o not in excused]
    wrong = sorted({f"{o.edge}:{short_id(o.variant_id)}" for o in outcomes if o.code == "OK" and not o.correct})
    known = ctx.known
    audits = {name: audit_edge(edge.cache, edge.metrics_address, known) for name, edge in ctx.cluster.edges.items()}
    corrupt = len(wrong) + sum(len(a["corrupt_files"]) + len(a["unverified_loads"]) for a in audits.values())
    telemetry = _telemetry_lost(ctx, start, outcomes, down)
    lost = {
        **seen["lost"],
        "telemetry_requests": {e: n for e, n in telemetry.items() if e not in down},
        "telemetry_requests_of_killed_edge": {e: n for e, n in telemetry.items() if e in down},
    }
    promised_lost = len(lost.get("state", [])) + sum(abs(n) for n in lost["telemetry_requests"].values())
    survived = (
        all(seen["checks"].values())
        and not failed
        and corrupt == 0
        and promised_lost == 0
        and seen["converge_s"] is not None
    )
    return {
        "survived": survived,
        "requests_sent": len(outcomes),
        "requests_failed": len(failed),
        "requests_failed_while_edge_down": sum(o.code != "OK" for o in excused),
        "corrupt_loads": corrupt,
        "data_lost": lost,
        "converge_s": seen["converge_s"],
        "checks": seen["checks"],
        "detail": {
            **seen["detail"],
            "wrong_answers": wrong,
            "failures": [
                {"edge": o.edge, "code": o.code, "after_fault_s": round(o.at - seen["fault_at"], 3)}
                for o in failed[:20]
            ],
            "edge_down_s": {e: b - a for e, (a, b) in down.items()},
            "audits": audits,
            "fault_to_recovery_s": seen["recovered_at"] - seen["fault_at"],
        },
    }


def _heal(ctx: Context) -> None:
    """After a fault that went wrong: every process up and every link open again."""
    cluster = ctx.cluster
    if cluster.cloud is None or cluster.cloud.process.poll() is not None:
        cluster.start_cloud()
    for edge in cluster.edges.values():
        edge.proxy.open()
    _start_edges(
        cluster,
        [name for name, edge in cluster.edges.items() if edge.child is None or edge.child.process.poll() is not None],
    )
    wait_until(lambda: converged(cluster.fleet()), ctx.plan["converge_s"])


def _scenario(ctx: Context, name: str, body) -> dict:
    log.info("fault %s", name)
    start = ctx.load.resume()
    try:
        seen = body(ctx)
    except Exception as err:
        log.exception("fault %s failed", name)
        ctx.load.pause()
        _heal(ctx)
        return {
            "name": name,
            "survived": False,
            "error": f"{type(err).__name__}: {err}",
            "requests_sent": 0,
            "requests_failed": 0,
            "corrupt_loads": 0,
            "data_lost": {},
            "converge_s": None,
        }
    end = ctx.load.pause()
    time.sleep(3 * ctx.plan["window_s"])  # the last windows close
    result = {"name": name, **_evaluate(ctx, seen, start, end)}
    log.info(
        "fault %s: survived %s, %d of %d requests failed, converged in %s s",
        name,
        result["survived"],
        result["requests_failed"],
        result["requests_sent"],
        result["converge_s"],
    )
    return result


def summarize(faults: list[dict]) -> dict:
    return {
        "faults_survived": sum(f["survived"] for f in faults),
        "faults_total": len(faults),
        "requests_failed_during_faults": sum(f["requests_failed"] for f in faults),
        "corrupt_loads": sum(f["corrupt_loads"] for f in faults),
    }


def _start_edges(cluster: Cluster, names: list[str]) -> None:
    """Start these edges side by side (each loads and profiles its portfolio)."""
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        for started in [pool.submit(cluster.start_edge, name) for name in names]:
            started.result()


def _start(cluster: Cluster, plan: dict) -> None:
    cluster.start_cloud()
    cluster.set_policy(slo_ms=SLO_MS, window_s=plan["window_s"])
    _start_edges(cluster, list(cluster.edges))
    if wait_until(lambda: converged(cluster.fleet()), 300) is None:
        raise RuntimeError("the fleet never settled before the faults")


def run(
    quick: bool, data_dir=None, work: Path | None = None, plan: dict | None = None, portfolio: Path | None = None
) -> dict:
    """`portfolio`: a base portfolio store to use instead of building one into `work`."""
    plan = dict(plan or (QUICK if quick else FULL))
    work = Path(work or "runs/bench-faults.work").resolve()
    base = Path(portfolio).resolve() if portfolio else base_portfolio(plan, work, data_dir)
    shutil.rmtree(work / "run", ignore_errors=True)
    run_dir = work / "run"
    payloads = [
        payload_portfolio(base, run_dir / f"payload-{i}", seed=i + 1, width=plan["payload_width"]) for i in range(2)
    ]
    images = portfolio_inputs(base, 2, data_dir=data_dir)
    reference = references([base, *(store for store, _ in payloads)], images)
    cluster, load = Cluster(run_dir, base, EDGES), None
    try:
        _start(cluster, plan)
        load = Load(
            cluster.client, {n: e.address for n, e in cluster.edges.items()}, images, reference, plan["interval_s"]
        )
        ctx = Context(cluster, plan, base, payloads, load, set(reference))
        faults = [_scenario(ctx, name, SCENARIOS[name]) for name in plan["scenarios"]]
    finally:
        if load is not None:
            load.close()
        cluster.close()
    return {
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
        "faults": faults,
        "summary": summarize(faults),
    }
