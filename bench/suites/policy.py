"""`prunefleet bench policy`: the adaptive policy against fixed-largest and fixed-smallest, one agent.

What it measures: whether an edge that switches variants under the coordinator's policy keeps more
requests within the SLO than its largest variant alone, and answers more of them right than its
smallest alone, while the load changes under it. One trace (the same Poisson arrivals) is replayed
three times: with the policy deciding, pinned to the largest variant, pinned to the smallest.

A real cloud and a real edge agent run as separate processes on loopback (`policy_parts`), serving a
portfolio of VGG-11 built on a Fashion-MNIST subset, so the variants' accuracies are real test
accuracies (the portfolio is cached in the work dir). The portfolio is `structured`'s (the method
`prunefleet bench frontier` finds best): the dense model and variants 2x to 6x faster at the batch
the edge serves (as far as the building CPU allows). The policy needs variants whose speeds differ
widely; shifter's levels of this model differ little in speed at batch 8, since global magnitude
pruning leaves the full-resolution convolutions that dominate its time nearly whole.

No rate in the trace is fixed, so that a slower or busier machine scales the trace instead of failing
it. The SLO comes from the edge's own on-device profile (`slo_factor` x the largest variant's p95 at the
typical batch); the load from what the edge serves right before the replays: with `mu` the requests
per second it answers on one variant under closed-loop load (measured for `capacity_s` on the largest
and on the smallest), the trace is steady at `steady` x mu(largest), a step up to `MAX_UTILIZATION` x
mu(smallest) (a load the smallest serves with room) or `OVER_LARGEST` x mu(largest), whichever is less
(the report says how far past each capacity that is), a burst `burst` times that, and a step down to
steady. The bound over the largest keeps the trace within what the load generator and the gRPC stack
deliver: the smallest variant, served optimized, answers several times the largest's requests, and
near its capacity a replay is bound by the machine rather than the model, so it would measure the
sender instead of the policy.

The edge runs on a CPU of its own (`placement`), as a device does; the cloud and this process, which
sends the load, share the others, since on the same cores the load generator's own delays would count
as the edge's. A request is timed from when it was due, and the sender records how late it sent each
one (`late_at_send`).

The same is then run on ONNX Runtime edges (`bench.suites.policy_ort`): the adaptive policy on the
portfolio's float32 members, and again with every variant's int8 member added, under one SLO and trace.

Reported per run: SLO attainment (share of requests answered within the SLO, client side), effective
accuracy (the answering variant's test accuracy averaged over all requests, a late or failed request
counting as wrong) and the switches the edge made during the trace (from `ListEvents`). The figures of
runs are in docs/results.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import grpc
import numpy as np

from bench.load.open_loop import Phase, replay
from bench.suites import policy_parts
from bench.suites.policy_parts import PLAIN
from cloud.admin import operator_client
from cloud.localfleet.inputs import portfolio_inputs
from common.files import short_id
from common.wire import GRPC_OPTIONS, to_proto
from protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
FULL = {
    "width": 0.5,
    "subset": 6000,
    "epochs": 3,
    "method": "structured",
    "speedups": (2.0, 3.0, 4.0, 6.0),
    "finetune_epochs": 2,
    "latency_batch": 8,  # the batch the edge serves here
    "phase_s": 20.0,
    "warmup_s": 4.0,
    "batch": 8,
    "slo_factor": 5.0,
    "steady": 0.35,
    "burst": 1.1,
    "window_s": 0.5,
    "capacity_s": 4.0,
}
QUICK = {
    **FULL,
    "subset": 2000,
    "epochs": 2,
    "speedups": (2.0, 4.0),
    "finetune_epochs": 1,
    "phase_s": 8.0,
    "warmup_s": 3.0,
}
# Stepping down takes one window over the SLO (every window late costs requests); stepping up takes
# four windows with room and 2 s since the last switch (hysteresis).
POLICY = {"down_windows": 1, "up_windows": 4, "up_headroom": 0.7, "dwell_s": 2.0, "max_switches_per_minute": 6}
MAX_UTILIZATION = 0.6
OVER_LARGEST = 1.5  # the step up asks the largest variant for this multiple of its capacity, at most


def trace(plan: dict, mu_largest: float, mu_smallest: float) -> list[Phase]:
    """The load the three replays share, from the edge's capacities (`mu`, requests/s) on the largest and smallest."""
    high = min(MAX_UTILIZATION * mu_smallest, OVER_LARGEST * mu_largest)
    steady = plan["steady"] * mu_largest
    seconds = plan["phase_s"]
    return [
        Phase("steady", seconds, steady),
        Phase("step up", seconds, high),
        Phase("burst", seconds / 2, high * plan["burst"]),
        Phase("step down", seconds, steady),
    ]


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


def replay_trace(cloud, edge, stub, request, phases, plan, pin: str, accuracy, slo_ms) -> dict:
    """One replay of the trace, pinned to `pin` or (when empty) with the policy deciding, scored from both ends."""
    if pin:
        policy_parts.pin(cloud, stub, request, pin)
    else:
        operator_client.set_policy(cloud.address, PLAIN, pinned_variant="")
    replay(stub, request, [Phase("warmup", plan["warmup_s"], phases[0].rate)], seed=1)
    since, before = time.time(), policy_parts.edge_counts(edge.metrics_address, slo_ms)
    outcomes = replay(stub, request, phases, seed=0)
    after = policy_parts.edge_counts(edge.metrics_address, slo_ms)
    time.sleep(1.0)  # the last switch events reach the coordinator
    answered = after["answered"] - before["answered"]
    result = {
        **score(outcomes, accuracy, slo_ms),
        "timeline": timeline(outcomes, slo_ms),
        "edge_gc_collections": {g: after["gc"][g] - before["gc"].get(g, 0.0) for g in after["gc"]},
        "edge_answered": answered,  # the edge's own view: served within the SLO, of what it answered
        "edge_within_slo": (after["within"] - before["within"]) / answered if answered else 0.0,
    }
    switches = policy_parts.switches(cloud, since)
    result["switches"] = len(switches)
    result["switch_log"] = [
        {"t": e.timestamp - since, "to": short_id(e.to_variant), "reason": e.reason_code, "load_ms": e.load_ms}
        for e in switches
    ]
    return result


def variant_rows(variants, profiles: dict) -> list[dict]:
    """Each variant as the report lists it: its accuracy and size, and the edge's profile of it."""
    return [
        {
            "name": v.name,
            "id": short_id(v.variant_id),
            "accuracy": v.accuracy,
            "params": v.params,
            "p50_ms_batch": profiles[v.variant_id].p50_ms_batch,
            "p95_ms_batch": profiles[v.variant_id].p95_ms_batch,
        }
        for v in variants
    ]


def _experiment(cloud, edge, store, plan: dict, data_dir) -> dict:
    """The SLO and the policy from the edge's profile, the trace from its capacities, then the three replays."""
    variants = store.manifest().variants
    profiles = policy_parts.profiles(cloud, len(variants))
    accuracy = {v.variant_id: v.accuracy for v in variants}
    largest = max(variants, key=lambda v: (v.params, v.accuracy))
    smallest = min(variants, key=lambda v: (v.params, -v.accuracy))
    slo_ms = plan["slo_factor"] * profiles[largest.variant_id].p95_ms_batch
    operator_client.set_policy(cloud.address, PLAIN, slo_ms=slo_ms, window_s=plan["window_s"], **POLICY)
    images = portfolio_inputs(store, plan["batch"], data_dir=data_dir)
    request = inference_pb2.PredictRequest(input=to_proto(images))
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge.address, options=GRPC_OPTIONS))
    mu = {
        v.variant_id: policy_parts.capacity(cloud, stub, request, v.variant_id, plan["capacity_s"])
        for v in (largest, smallest)
    }
    phases = trace(plan, mu[largest.variant_id], mu[smallest.variant_id])
    runs = {
        name: replay_trace(cloud, edge, stub, request, phases, plan, pin, accuracy, slo_ms)
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
        "variants": variant_rows(variants, profiles),
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


def fresh_fleet(work: Path, name: str = "fleet") -> Path:
    """The coordinator's state and the edge's cache, empty: an earlier run's portfolio or policy must not
    carry over into this one."""
    fleet = work / name
    shutil.rmtree(fleet, ignore_errors=True)
    fleet.mkdir(parents=True)
    return fleet


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    """The suite: the portfolio (built or reused), a fresh cloud and edge placed on their CPUs, the
    experiment; then the same on ONNX Runtime edges with and without int8 members (`policy_ort`)
    unless the plan says `"ort": False`."""
    from bench.suites import policy_ort  # it builds on this module

    plan = QUICK if quick else FULL
    work = Path(work or "runs/bench-policy.work")
    store = policy_parts.build_portfolio(plan, work, data_dir)
    fleet = fresh_fleet(work)
    edge_cpus, others = placement(list(os.sched_getaffinity(0)))
    with policy_parts.cloud_and_edge(store, fleet, work / "logs", plan["batch"], edge_cpus, others) as (cloud, edge):
        placed = {
            "edge_cpus": sorted(os.sched_getaffinity(edge.process.pid)),
            "cloud_and_load_cpus": sorted(os.sched_getaffinity(0)),
        }
        result = _experiment(cloud, edge, store, plan, data_dir)
    result["plan"] = dict(plan)
    result["policy"] = dict(POLICY)
    result["placement"] = placed  # as the edge process and this one ran
    result["summary"] = summarize(result)
    if plan.get("ort", True):
        result["onnxruntime"] = policy_ort.experiment(store, plan, work, data_dir, edge_cpus, others)
        result["summary"].update(policy_ort.summarize(result["onnxruntime"]))
    return result
