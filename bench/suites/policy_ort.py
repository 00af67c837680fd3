"""The policy benchmark on ONNX Runtime edges: the same edge with int8 members and without them.

Two runs of the adaptive policy, each against a fresh cloud and a fresh `--backend onnxruntime` edge
(placed as the torch edge is, `bench.suites.policy.placement`): first on the suite's portfolio as
built (float32 members, each served from its ONNX file), then on a copy of it with every variant's
int8 member added (`prunefleet portfolio quantize`: `cloud.build.int8_members`, calibrated on the
build's training images, each member's accuracy measured on the whole test split), so the policy
chooses along pruning x precision.

Both runs replay the same trace under the same SLO, both taken from the float32 edge as the torch
run takes its own: the SLO from its profile of the largest variant, the trace from its capacity on
the largest and smallest. So the int8 edge meets the load the float32 one was sized for, and the
question is only whether its extra members answer more requests right within the SLO (effective
accuracy; a late or failed request counts as wrong) without giving up attainment.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import grpc

from bench.suites import policy, policy_parts
from bench.suites.policy_parts import PLAIN
from cloud.admin import operator_client
from cloud.build.int8_members import QuantizeSettings, add_int8
from cloud.build.store import INT8, PortfolioStore, StoreError
from cloud.localfleet.inputs import portfolio_inputs
from common.wire import GRPC_OPTIONS, to_proto
from protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)
BACKEND = "onnxruntime"


def int8_store(store: PortfolioStore, data_dir) -> PortfolioStore:
    """A copy of `store` beside it with every float32 variant's int8 member added; kept for a rerun."""
    target = store.root.with_name(f"{store.root.name}-int8")
    try:
        PortfolioStore(target).manifest()
        return PortfolioStore(target)
    except StoreError:
        pass
    staging = target.with_name(f"{target.name}.part")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(store.root, staging)
    _, added = add_int8(QuantizeSettings(store=staging, data_dir=Path(data_dir) if data_dir else None))
    log.info("int8 members added: %d", added)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return PortfolioStore(target)


def _calibrate(cloud, stub, request, variants, profiles, plan: dict) -> dict:
    """The SLO and trace of the float32 edge (as `bench.suites.policy` takes them for torch)."""
    largest = max(variants, key=lambda v: (v.params, v.accuracy))
    smallest = min(variants, key=lambda v: (v.params, -v.accuracy))
    slo_ms = plan["slo_factor"] * profiles[largest.variant_id].p95_ms_batch
    operator_client.set_policy(cloud.address, PLAIN, slo_ms=slo_ms, window_s=plan["window_s"], **policy.POLICY)
    mu = {
        v.variant_id: policy_parts.capacity(cloud, stub, request, v.variant_id, plan["capacity_s"])
        for v in (largest, smallest)
    }
    return {
        "slo_ms": slo_ms,
        "phases": policy.trace(plan, mu[largest.variant_id], mu[smallest.variant_id]),
        "capacity_rps": {"largest": mu[largest.variant_id], "smallest": mu[smallest.variant_id]},
        "largest": largest.name,
        "smallest": smallest.name,
    }


def _run(cloud, edge, store: PortfolioStore, plan: dict, data_dir, calibration: dict | None) -> tuple[dict, dict]:
    """The adaptive replay on one ONNX Runtime edge, calibrated here when no calibration is given."""
    variants = store.manifest().variants
    profiles = policy_parts.profiles(cloud, len(variants))
    images = portfolio_inputs(store, plan["batch"], data_dir=data_dir)
    request = inference_pb2.PredictRequest(input=to_proto(images))
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge.address, options=GRPC_OPTIONS))
    if calibration is None:
        floats = [v for v in variants if v.precision != INT8]
        calibration = _calibrate(cloud, stub, request, floats, profiles, plan)
    else:
        operator_client.set_policy(
            cloud.address, PLAIN, slo_ms=calibration["slo_ms"], window_s=plan["window_s"], **policy.POLICY
        )
    accuracy = {v.variant_id: v.accuracy for v in variants}
    slo_ms = calibration["slo_ms"]
    result = policy.replay_trace(cloud, edge, stub, request, calibration["phases"], plan, "", accuracy, slo_ms)
    rows = policy.variant_rows(variants, profiles)
    result["variants"] = [{**row, "precision": v.precision} for row, v in zip(rows, variants)]
    return result, calibration


def experiment(store: PortfolioStore, plan: dict, work: Path, data_dir, edge_cpus, others) -> dict:
    """The float32 run, then the int8 one on the same SLO and trace (module docstring)."""
    stores = {"fp32": store, "int8": int8_store(store, data_dir)}
    runs, calibration = {}, None
    for name, held in stores.items():
        fleet = policy.fresh_fleet(work, f"fleet-ort-{name}")
        with policy_parts.cloud_and_edge(
            held, fleet, work / "logs" / f"ort-{name}", plan["batch"], edge_cpus, others, backend=BACKEND
        ) as (cloud, edge):
            runs[name], calibration = _run(cloud, edge, held, plan, data_dir, calibration)
    return {
        "slo_ms": calibration["slo_ms"],
        "trace": [vars(p) for p in calibration["phases"]],
        "capacity_rps": calibration["capacity_rps"],
        "largest": calibration["largest"],
        "smallest": calibration["smallest"],
        "runs": runs,
    }


def summarize(ort: dict) -> dict:
    """The summary keys of the ONNX Runtime runs."""
    summary = {}
    for name, run in ort["runs"].items():
        summary[f"ort_{name}_effective_accuracy"] = run["effective_accuracy"]
        summary[f"ort_{name}_attainment"] = run["slo_attainment"]
        summary[f"ort_{name}_switches"] = run["switches"]
        summary[f"ort_{name}_failed_requests"] = run["failed"]
    summary["ort_slo_ms"] = ort["slo_ms"]
    return summary
