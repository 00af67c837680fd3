"""`prunefleet bench policy`: the adaptive policy against fixed-largest and fixed-smallest, one agent.

A real cloud and a real edge agent run as separate processes on loopback, serving a portfolio of
VGG-11 built on a Fashion-MNIST subset (its variants' accuracies are real test accuracies; cached in
the work dir). The full plan's portfolio is `reconvene` (SynFlow) at compressions 1 (the dense model)
to 256: the policy needs variants whose speeds differ, and shifter's levels of this model differ by
only 1.3x at batch 8, since global magnitude pruning leaves the full-resolution convolutions that
dominate its time nearly whole (docs/results.md). The SLO comes from the edge's own on-device profile
(`slo_factor` x the largest variant's p95 at the typical batch); the load from what the edge serves
right before the replays: with `mu` the requests per second it answers on one variant under
closed-loop load (measured for `capacity_s` on the largest and on the smallest, so a busy machine
scales the trace), the trace is steady at `steady` x mu(largest), a step up to `MAX_UTILIZATION` x
mu(smallest) (a load the smallest serves with room) or `OVER_LARGEST` x mu(largest), whichever is
less (the report says how far past each capacity that is), a burst `burst` times that, and a step
down to steady. The bound over the largest keeps the trace within what the load generator and the
gRPC stack deliver: served optimized, this portfolio's smallest variant answered 568 requests/s
closed-loop, 3.7x the largest, and at 60% of that the fixed smallest replay was late on 14% of its
requests, bound by the machine rather than the model (docs/results.md). The same trace (same
Poisson arrivals) is replayed three times: with the policy deciding, pinned to the largest variant,
pinned to the smallest.

The edge runs on a CPU of its own (`placement`), as a device does; the cloud and this process, which
sends the load, share the others. On the same cores, the load generator's own delays counted as the
edge's: a request is timed from when it was due, and the sender records how late it sent each one
(`late_at_send`).

Reported per run: SLO attainment (share of requests answered within the SLO, client side), effective
accuracy (the answering variant's test accuracy averaged over all requests, a late or failed request
counting as wrong) and the switches the edge made during the trace (from `ListEvents`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.load.open_loop import Phase, replay
from cloud.admin import operator_client
from cloud.build import portfolio
from cloud.build.methods import reconvene, shifter
from cloud.build.store import PortfolioStore, StoreError
from cloud.build.train import TrainConfig
from cloud.localfleet import processes
from common import datasets
from common.files import short_id
from common.security import Transport
from common.wire import GRPC_OPTIONS, to_proto
from protos import coordinator_pb2, inference_pb2, inference_pb2_grpc

PLAIN = Transport.plaintext()  # these processes run plaintext (--insecure)

log = logging.getLogger(__name__)
FULL = {
    "width": 0.5,
    "subset": 6000,
    "epochs": 2,
    "method": "reconvene",
    "compressions": (1, 4, 16, 64, 256),
    "phase_s": 20.0,
    "warmup_s": 4.0,
    "batch": 8,
    "slo_factor": 5.0,
    "steady": 0.35,
    "burst": 1.1,
    "window_s": 0.5,
    "capacity_s": 4.0,
}
QUICK = {**FULL, "subset": 2000, "epochs": 1, "compressions": (1, 16, 256), "phase_s": 8.0, "warmup_s": 3.0}
# Stepping down takes one window over the SLO (every window late costs requests); stepping up takes
# four windows with room and 2 s since the last switch (hysteresis).
POLICY = {"down_windows": 1, "up_windows": 4, "up_headroom": 0.7, "dwell_s": 2.0, "max_switches_per_minute": 6}
MAX_UTILIZATION = 0.6
OVER_LARGEST = 1.5  # the step up asks the largest variant for this multiple of its capacity, at most
EDGE = "edge-bench"


def build_portfolio(plan: dict, work: Path, data_dir) -> PortfolioStore:
    """The portfolio of this plan, built once (resumable) and kept in the work dir: `reconvene`
    (SynFlow) at `compressions`, or `shifter` with `levels` of `rate` when the plan has no method."""
    method = plan.get("method", "shifter")
    steps = ("compressions",) if method == "reconvene" else ("levels", "rate")
    recipe = "-".join(str(plan[k]).replace(", ", "_").strip("()") for k in ("width", "subset", "epochs", *steps))
    if method == "reconvene":  # a change of the method's defaults makes another portfolio
        recipe += f"-threshold{reconvene.DEFAULT_THRESHOLD:g}-coverage{reconvene.MIN_COVERAGE:g}"
    store = PortfolioStore(work / f"portfolio-{method}-{recipe}")
    try:
        store.manifest()
        return store
    except StoreError:
        pass
    if method == "reconvene":
        compressions = tuple(float(c) for c in plan["compressions"])
        method_config = {"reconvene": reconvene.ReconveneConfig(compressions=compressions)}
    else:
        method_config = {
            "shifter": shifter.ShifterConfig(
                levels=plan["levels"], rate=plan["rate"], rewind_iteration=min(20, plan["subset"] // 64)
            )
        }
    portfolio.build(
        portfolio.BuildConfig(
            out=store.root,
            method=method,
            model="vgg11",
            width=plan["width"],
            subset=plan["subset"],
            data_dir=data_dir,
            check_images=64,
            threads=1,
            train=TrainConfig(epochs=plan["epochs"], batch_size=64, progress=False),
            **method_config,
        )
    )
    return store


def trace(plan: dict, mu_largest: float, mu_smallest: float) -> list[Phase]:
    high = min(MAX_UTILIZATION * mu_smallest, OVER_LARGEST * mu_largest)
    steady = plan["steady"] * mu_largest
    seconds = plan["phase_s"]
    return [
        Phase("steady", seconds, steady),
        Phase("step up", seconds, high),
        Phase("burst", seconds / 2, high * plan["burst"]),
        Phase("step down", seconds, steady),
    ]


def _fleet(cloud):
    return operator_client.coordinator_stub(cloud.address, PLAIN).GetFleet(
        coordinator_pb2.GetFleetRequest(), timeout=10
    )


def _profiles(cloud, count: int) -> dict:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        edge = next((e for e in _fleet(cloud).edges if e.edge == EDGE), None)
        if edge is not None and len(edge.profiles) == count and edge.telemetry.active_variant:
            return {p.variant_id: p for p in edge.profiles}
        time.sleep(0.5)
    raise RuntimeError("the edge never reported a profile of every variant")


def _switches(cloud, since: float) -> list:
    reply = operator_client.coordinator_stub(cloud.address, PLAIN).ListEvents(
        coordinator_pb2.ListEventsRequest(edge=EDGE, since=since, limit=1000), timeout=10
    )
    return [e.event for e in reply.events if e.event.switched]


def score(outcomes, accuracy: dict[str, float], slo_ms: float) -> dict:
    """`late_at_send` counts the requests the load generator itself sent a tenth of the SLO or more
    after their time (a late request among them was late partly or wholly before the edge saw it)."""
    on_time = [o for o in outcomes if o.code == "OK" and o.latency_ms <= slo_ms]
    total = max(len(outcomes), 1)
    lags = [o.send_lag_ms for o in outcomes]
    return {
        "requests": len(outcomes),
        "failed": sum(o.code != "OK" for o in outcomes),
        "slo_attainment": len(on_time) / total,
        "late_at_send": sum(lag >= slo_ms / 10 for lag in lags),
        "late_at_send_and_over_slo": sum(o.send_lag_ms >= slo_ms / 10 and o.latency_ms > slo_ms for o in outcomes),
        "send_lag_p99_ms": float(np.percentile(lags, 99)) if lags else 0.0,
        "effective_accuracy": sum(accuracy.get(o.variant_id, 0.0) for o in on_time) / total,
        "p95_ms": float(np.percentile([o.latency_ms for o in outcomes], 95)) if outcomes else 0.0,
        "by_phase": {
            p: sum(o.latency_ms <= slo_ms and o.code == "OK" for o in outcomes if o.phase == p)
            / max(1, sum(o.phase == p for o in outcomes))
            for p in dict.fromkeys(o.phase for o in outcomes)
        },
    }


def timeline(outcomes, slo_ms: float) -> list[dict]:
    """Per second of the trace: requests sent, the share answered within the SLO, the variants answering."""
    seconds: dict[int, list] = {}
    for o in outcomes:
        seconds.setdefault(int(o.sent_at), []).append(o)
    return [
        {
            "t": t,
            "requests": len(group),
            "on_time": sum(o.code == "OK" and o.latency_ms <= slo_ms for o in group) / len(group),
            "variants": sorted({short_id(o.variant_id) for o in group if o.variant_id}),
        }
        for t, group in sorted(seconds.items())
    ]


def _pin(cloud, stub, request, variant_id: str) -> None:
    """Pin and wait until the edge answers on that variant."""
    operator_client.set_policy(cloud.address, PLAIN, pinned_variant=variant_id)
    deadline = time.monotonic() + 60
    while stub.Predict(request, timeout=30).variant_id != variant_id:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge never switched to {short_id(variant_id)}")
        time.sleep(0.1)


def capacity(cloud, stub, request, variant_id: str, seconds: float, clients: int = 4) -> float:
    """Requests per second the edge serves on `variant_id` right now (closed loop, `clients` at once)."""
    _pin(cloud, stub, request, variant_id)
    done, stop = [0] * clients, time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            stub.Predict(request, timeout=30)
            done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def edge_counts(metrics_address: str, slo_ms: float) -> dict:
    """From the edge's metrics endpoint: its garbage collections so far by generation, and the
    requests it answered and those it answered within `slo_ms` (from the servicer taking a request to
    its answer; the time in gRPC and on the network is not in it)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    samples = families["prunefleet_edge_request_duration_seconds"].samples
    return {
        "gc": {
            s.labels["generation"]: s.value
            for s in families["python_gc_collections"].samples
            if s.name.endswith("_total")
        },
        "answered": sum(s.value for s in samples if s.name.endswith("_count")),
        "within": sum(
            s.value for s in samples if s.name.endswith("_bucket") and abs(float(s.labels["le"]) - slo_ms / 1e3) < 1e-6
        ),
    }


def _run(cloud, edge, stub, request, phases, plan, pin: str, accuracy, slo_ms) -> dict:
    if pin:
        _pin(cloud, stub, request, pin)
    else:
        operator_client.set_policy(cloud.address, PLAIN, pinned_variant="")
    replay(stub, request, [Phase("warmup", plan["warmup_s"], phases[0].rate)], seed=1)
    since, before = time.time(), edge_counts(edge.metrics_address, slo_ms)
    outcomes = replay(stub, request, phases, seed=0)
    after = edge_counts(edge.metrics_address, slo_ms)
    time.sleep(1.0)  # the last switch events reach the coordinator
    answered = after["answered"] - before["answered"]
    result = {
        **score(outcomes, accuracy, slo_ms),
        "timeline": timeline(outcomes, slo_ms),
        "edge_gc_collections": {g: after["gc"][g] - before["gc"].get(g, 0.0) for g in after["gc"]},
        "edge_answered": answered,  # the edge's own view: served within the SLO, of what it answered
        "edge_within_slo": (after["within"] - before["within"]) / answered if answered else 0.0,
    }
    switches = _switches(cloud, since)
    result["switches"] = len(switches)
    result["switch_log"] = [
        {"t": e.timestamp - since, "to": short_id(e.to_variant), "reason": e.reason_code, "load_ms": e.load_ms}
        for e in switches
    ]
    return result


def _experiment(cloud, edge, store: PortfolioStore, plan: dict, data_dir) -> dict:
    variants = store.manifest().variants
    profiles = _profiles(cloud, len(variants))
    accuracy = {v.variant_id: v.accuracy for v in variants}
    largest = max(variants, key=lambda v: (v.params, v.accuracy))
    smallest = min(variants, key=lambda v: (v.params, -v.accuracy))
    slo_ms = plan["slo_factor"] * profiles[largest.variant_id].p95_ms_batch
    operator_client.set_policy(cloud.address, PLAIN, slo_ms=slo_ms, window_s=plan["window_s"], **POLICY)
    images = datasets.load("fashion-mnist", data_dir).test.images[: plan["batch"]].numpy()
    request = inference_pb2.PredictRequest(input=to_proto(images))
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge.address, options=GRPC_OPTIONS))
    mu = {v.variant_id: capacity(cloud, stub, request, v.variant_id, plan["capacity_s"]) for v in (largest, smallest)}
    phases = trace(plan, mu[largest.variant_id], mu[smallest.variant_id])
    runs = {
        name: _run(cloud, edge, stub, request, phases, plan, pin, accuracy, slo_ms)
        for name, pin in (
            ("adaptive", ""),
            ("fixed_largest", largest.variant_id),
            ("fixed_smallest", smallest.variant_id),
        )
    }
    operator_client.set_policy(cloud.address, PLAIN, pinned_variant="")
    return {
        "slo_ms": slo_ms,
        "trace": [vars(p) for p in phases],
        "runs": runs,
        "capacity_rps": {"largest": mu[largest.variant_id], "smallest": mu[smallest.variant_id]},
        "step_up_load": {
            "largest": phases[1].rate / mu[largest.variant_id],
            "smallest": phases[1].rate / mu[smallest.variant_id],
        },
        "variants": [
            {
                "name": v.name,
                "id": short_id(v.variant_id),
                "accuracy": v.accuracy,
                "params": v.params,
                "p50_ms_batch": profiles[v.variant_id].p50_ms_batch,
                "p95_ms_batch": profiles[v.variant_id].p95_ms_batch,
            }
            for v in variants
        ],
        "largest": largest.name,
        "smallest": smallest.name,
    }


def summarize(result: dict) -> dict:
    runs = result["runs"]
    return {
        "slo_attainment": runs["adaptive"]["slo_attainment"],
        "slo_attainment_fixed_largest": runs["fixed_largest"]["slo_attainment"],
        "slo_attainment_fixed_smallest": runs["fixed_smallest"]["slo_attainment"],
        "effective_accuracy": runs["adaptive"]["effective_accuracy"],
        "effective_accuracy_fixed_smallest": runs["fixed_smallest"]["effective_accuracy"],
        "effective_accuracy_fixed_largest": runs["fixed_largest"]["effective_accuracy"],
        "switches": runs["adaptive"]["switches"],
        "load_steps": len(result["trace"]),
        "failed_requests": runs["adaptive"]["failed"],
        "slo_ms": result["slo_ms"],
    }


def placement(cpus: list[int]) -> tuple[list[int], list[int]]:
    """The CPUs of the edge, and those of everything else (the cloud, and this process: the load
    generator). The edge gets the last CPU to itself, as a device has its own cores and its clients
    run elsewhere; on a single CPU everything shares it."""
    cpus = sorted(cpus)
    return (cpus[-1:], cpus[:-1]) if len(cpus) > 1 else (cpus, cpus)


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    plan = QUICK if quick else FULL
    work = Path(work or "runs/bench-policy.work")
    store = build_portfolio(plan, work, data_dir)
    fleet = work / "fleet"  # coordinator state and edge cache start empty: an earlier run's portfolio
    shutil.rmtree(fleet, ignore_errors=True)  # or policy must not carry over into this one
    fleet.mkdir(parents=True)
    logs = work / "logs"
    edge_cpus, others = placement(list(os.sched_getaffinity(0)))
    before = processes.pin_this_process(others)
    children = []
    try:
        cloud = processes.start(
            "cloud",
            [
                "cloud.cli",
                "cloud",
                "serve",
                "--insecure",
                "--store",
                str(store.root),
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--db",
                str(fleet / "fleet.sqlite"),
            ],
            logs,
            affinity=others,
        )
        children.append(cloud)
        children.append(
            processes.start(
                "edge",
                [
                    "edge.cli",
                    "run",
                    "--insecure",
                    "--cloud",
                    cloud.address,
                    "--name",
                    EDGE,
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                    "--cache",
                    str(fleet / "cache"),
                    "--threads",
                    "1",
                    "--batch",
                    str(plan["batch"]),
                ],
                logs,
                timeout_s=600,
                affinity=edge_cpus,
            )
        )
        placed = {
            "edge_cpus": sorted(os.sched_getaffinity(children[1].process.pid)),
            "cloud_and_load_cpus": sorted(os.sched_getaffinity(0)),
        }
        result = _experiment(cloud, children[1], store, plan, data_dir)
    finally:
        for child in reversed(children):
            child.stop()
        processes.pin_this_process(before)
    result["plan"] = dict(plan)
    result["policy"] = dict(POLICY)
    result["placement"] = placed  # as the edge process and this one ran
    result["summary"] = summarize(result)
    return result
