"""The faults, one function each. Each breaks the running cluster while the clients' load goes on,
brings it back, and returns what it saw: when the fault hit (`fault_at`), when recovery began
(`recovered_at`: the restart or the end of the cut), how long the fleet took from there to converge
(`converge_s`, None past the deadline), edges that were down on purpose (`killed`: name -> when it
was killed and when it was started again), the checks of its own promises (`checks`), lost state
and events (`lost`) and details."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from bench.faults.checks import converged, disk_state, rpc_state, state_lost, wait_until
from cloud.build.store import PortfolioStore
from common.wire import CHUNK_BYTES

LOGGED_DECISION = re.compile(r" INFO (switch|decision) \S+ -> \S+ in ")


def outcome(
    fault_at: float,
    recovered_at: float,
    converge_s: float | None,
    checks: dict[str, bool],
    killed: dict | None = None,
    lost: dict | None = None,
    detail: dict | None = None,
) -> dict:
    """What a scenario hands the suite: when the fault struck and the fleet recovered, how long it took to
    converge (None: never), the processes killed (name -> (killed at, restarted at)), what was lost, the
    checks it made, and any detail worth reporting."""
    result = {
        "fault_at": fault_at,
        "recovered_at": recovered_at,
        "converge_s": converge_s,
        "killed": killed or {},
        "lost": lost or {},
        "checks": checks,
    }
    return result | ({"detail": detail} if detail is not None else {})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _state(ctx, rollout_id: int) -> str:
    return next((r.state for r in ctx.cluster.rollouts() if r.id == rollout_id), "")


def _settled(ctx, rollout_id: int = 0, pins: dict | None = None):
    """Seconds until the whole fleet holds what is desired (and the rollout is over), or None."""
    return wait_until(
        lambda: converged(ctx.cluster.fleet(), pins) and (not rollout_id or _state(ctx, rollout_id) == "complete"),
        ctx.plan["converge_s"],
    )


def _holds(ctx, edge: str, store: Path) -> bool:
    want = PortfolioStore(store).manifest().portfolio_id
    return any(e.edge == edge and e.reported_portfolio_id == want for e in ctx.cluster.fleet().edges)


def _kill_cloud(ctx) -> tuple[float, list[str], dict]:
    """SIGKILL the cloud; what of the state it reported just before is missing on disk."""
    before = rpc_state(ctx.cluster)
    killed_at = ctx.cluster.kill_cloud()
    return killed_at, state_lost(before, disk_state(ctx.cluster.db)), before


def _mid_download(ctx, edge: str, store: Path, variant_id: str) -> tuple[bool, int]:
    """Wait until `edge` has written at least a chunk of `variant_id`, but not all of it."""
    size = PortfolioStore(store).manifest().variants[-1].size_bytes
    part = ctx.cluster.edges[edge].part(variant_id)
    caught = wait_until(lambda: CHUNK_BYTES <= _size(part) < size, 120, 0.02) is not None
    return caught, size


def _resumed(size: int, kept: int, sent: int) -> bool:
    """The rest of the file was sent from the bytes on disk: at most the chunk in flight a second time."""
    return 0 < sent <= size - kept + CHUNK_BYTES and sent < size


def _slow_download(ctx, name: str, payload: tuple):
    """Deploy `payload` (a store and its new variant) to edge `name` over a throttled link and wait until
    the new variant's download is under way."""
    edge, (store, extra) = ctx.cluster.edges[name], payload
    edge.proxy.throttle(ctx.plan["throttle_bytes_s"])
    rollout = ctx.cluster.deploy(store, name, ctx.plan["min_windows"], canaries=name)
    caught, size = _mid_download(ctx, name, store, extra)
    return edge, store, extra, rollout, caught, size


def cloud_kill_during_transfer(ctx) -> dict:
    """The edge downloads a new portfolio over a slow link; the cloud dies mid-file."""
    edge, store, extra, rollout, caught, size = _slow_download(ctx, "edge-1", ctx.payloads[0])
    fault_at, lost, _ = _kill_cloud(ctx)
    kept = _size(edge.part(extra))
    time.sleep(ctx.plan["kill_pause_s"])
    ctx.cluster.start_cloud()
    recovered_at = time.time()
    adopted = wait_until(lambda: _holds(ctx, "edge-1", store), ctx.plan["converge_s"])
    sent = ctx.cluster.bytes_sent()  # by the new cloud process: only this download
    edge.proxy.open()
    converge_s = _settled(ctx, rollout.id)
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        {
            "caught mid-download": caught,
            "partial file kept": kept >= CHUNK_BYTES,
            "download resumed from the partial file": _resumed(size, kept, sent),
            "adopted": adopted is not None,
            "rollout completed": converge_s is not None,
        },
        lost={"state": lost},
        detail={"variant_bytes": size, "part_bytes_at_kill": kept, "bytes_sent_after": sent, "rollout": rollout.id},
    )


def cloud_kill_during_rollout(ctx) -> dict:
    """A rollout back to the base portfolio; the cloud dies while its canary is being judged."""
    rollout = ctx.cluster.deploy(ctx.base, "*", ctx.plan["judge_windows"], canaries="edge-1")
    adopted = wait_until(lambda: _holds(ctx, "edge-1", ctx.base), ctx.plan["converge_s"])
    judging = _state(ctx, rollout.id) == "canary"
    fault_at, lost, _ = _kill_cloud(ctx)
    time.sleep(ctx.plan["kill_pause_s"])
    ctx.cluster.start_cloud()
    recovered_at = time.time()
    converge_s = _settled(ctx, rollout.id)
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        {
            "canary adopted": adopted is not None,
            "killed while the canary was judged": judging,
            "rollout completed after the restart": converge_s is not None,
        },
        lost={"state": lost},
        detail={"rollout": rollout.id, "state_at_kill": "canary" if judging else _state(ctx, rollout.id)},
    )


def edge_kill_during_download(ctx) -> dict:
    """An edge dies in the middle of a download over a slow link and is started again."""
    edge, _, extra, rollout, caught, size = _slow_download(ctx, "edge-2", ctx.payloads[1])
    fault_at = ctx.cluster.kill_edge("edge-2")
    kept, before = _size(edge.part(extra)), ctx.cluster.bytes_sent()
    final_absent = not (edge.cache / f"{extra}.safetensors").exists()
    restarted_at = time.time()
    ctx.cluster.start_edge("edge-2")
    recovered_at = time.time()
    sent = ctx.cluster.bytes_sent() - before  # the edge serves only once its portfolio is loaded
    edge.proxy.open()
    converge_s = _settled(ctx, rollout.id)
    checks = {
        "caught mid-download": caught,
        "partial file kept, never in place": kept >= CHUNK_BYTES and final_absent,
        "download resumed from the partial file": _resumed(size, kept, sent),
        "rollout completed": converge_s is not None,
    }
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        checks,
        killed={"edge-2": (fault_at, restarted_at)},
        detail={
            "variant_bytes": size,
            "part_bytes_at_kill": kept,
            "bytes_sent_after": sent,
            "rollout": rollout.id,
            "restart_to_serving_s": recovered_at - fault_at,
        },
    )


def _flip(ctx, edge: str, variants: tuple[str, str], stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        try:
            ctx.cluster.pin(edge, variants[i % 2])
        except Exception:
            pass
        i += 1
        stop.wait(ctx.plan["flip_s"])


def _decisions_logged(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if LOGGED_DECISION.search(line))


def edge_kill_during_switch(ctx) -> dict:
    """An edge with a memory budget (each switch loads a variant from its cache) is pinned back and forth
    and killed while it switches; it comes back on the variant it is pinned to."""
    edge = ctx.cluster.edges["edge-1"]
    variants = tuple(v.variant_id for v in PortfolioStore(ctx.base).manifest().variants[:2])
    started, log = edge.started_at, edge.child.log_path
    stop = threading.Event()
    flipper = threading.Thread(target=_flip, args=(ctx, "edge-1", variants, stop), daemon=True)
    since = time.time()
    flipper.start()
    switching = wait_until(lambda: sum(e.event.switched for e in ctx.cluster.events("edge-1", since)) >= 3, 120)
    time.sleep(ctx.plan["flip_s"] * 0.5)
    fault_at = ctx.cluster.kill_edge("edge-1")
    stop.set()
    flipper.join(30)
    ctx.cluster.pin("edge-1", variants[0])  # what it must come back to
    restarted_at = time.time()
    ctx.cluster.start_edge("edge-1")
    recovered_at = time.time()
    converge_s = _settled(ctx, pins={"edge-1": variants[0]})
    stored = [e for e in ctx.cluster.events("edge-1", started) if e.event.timestamp <= fault_at]
    logged = _decisions_logged(log)
    ctx.cluster.pin("edge-1", "")
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        {
            "switching when killed": switching is not None,
            "back on its pinned variant": converge_s is not None,
        },
        killed={"edge-1": (fault_at, restarted_at)},
        lost={"switch_events_of_killed_edge": max(0, logged - len(stored))},
        detail={
            "decisions_logged": logged,
            "events_stored": len(stored),
            "restart_to_serving_s": recovered_at - fault_at,
        },
    )


def coordinator_restart_under_load(ctx) -> dict:
    """The coordinator is stopped and started again while every edge serves."""
    before = rpc_state(ctx.cluster)
    fault_at = time.time()
    ctx.cluster.cloud.stop()
    lost = state_lost(before, disk_state(ctx.cluster.db))
    ctx.cluster.start_cloud()
    recovered_at = time.time()
    lost += state_lost(before, rpc_state(ctx.cluster))
    converge_s = _settled(ctx)
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        {"fleet converged": converge_s is not None},
        lost={"state": lost},
        detail={"down_s": recovered_at - fault_at},
    )


def network_cut(ctx) -> dict:
    """An edge's link to the cloud is cut; the policy changes meanwhile; the link comes back."""
    edge = ctx.cluster.edges["edge-2"]
    cut_s = ctx.plan["cut_s"]
    edge.proxy.cut()
    fault_at = time.time()
    time.sleep(min(1.0, cut_s / 4))
    policy = ctx.cluster.set_policy(dwell_s=ctx.cluster.fleet().policy.dwell_s + 1.0)
    time.sleep(max(0.0, fault_at + cut_s - time.time()))
    edge.proxy.restore()
    recovered_at = time.time()
    converge_s = _settled(ctx)
    applied = any(e.edge == "edge-2" and e.policy_version >= policy.version for e in ctx.cluster.fleet().edges)
    return outcome(
        fault_at,
        recovered_at,
        converge_s,
        {
            "policy changed during the cut applied after it": applied,
            "fleet converged": converge_s is not None,
        },
        detail={"cut_s": recovered_at - fault_at, "policy_version": policy.version},
    )


SCENARIOS = {
    "cloud_kill_during_transfer": cloud_kill_during_transfer,
    "cloud_kill_during_rollout": cloud_kill_during_rollout,
    "edge_kill_during_download": edge_kill_during_download,
    "edge_kill_during_switch": edge_kill_during_switch,
    "coordinator_restart_under_load": coordinator_restart_under_load,
    "network_cut": network_cut,
}
