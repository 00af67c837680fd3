"""The policy benchmark: its trace and scoring, and a tiny run against a real cloud and edge."""

import gc
import json
import os

from bench.__main__ import main
from bench.load.open_loop import Outcome
from bench.suites import policy

TINY = {
    "width": 0.125,
    "subset": 256,
    "test_subset": 1000,
    "epochs": 1,
    "method": "reconvene",
    "compressions": (1, 16),
    "phase_s": 0.8,
    "warmup_s": 0.3,
    "batch": 4,
    "slo_factor": 5.0,
    "steady": 0.35,
    "burst": 1.1,
    "window_s": 0.25,
    "capacity_s": 0.6,
}
KEYS = {
    "slo_attainment",
    "slo_attainment_fixed_largest",
    "effective_accuracy",
    "effective_accuracy_fixed_smallest",
    "effective_accuracy_fixed_largest",
    "switches",
    "load_steps",
}
ORT_KEYS = {f"ort_{name}_{figure}" for name in ("fp32", "int8") for figure in ("effective_accuracy", "attainment")}


def test_the_trace_steps_from_what_the_largest_serves_to_what_only_the_smallest_serves():
    plan = {"steady": 0.35, "burst": 1.1, "phase_s": 10.0}
    phases = policy.trace(plan, mu_largest=100.0, mu_smallest=200.0)
    assert [p.name for p in phases] == ["steady", "step up", "burst", "step down"]
    steady, high, burst, down = (p.rate for p in phases)
    assert steady == down == 35.0 and high == policy.MAX_UTILIZATION * 200.0 > 100.0 and burst == high * 1.1
    # a smallest variant far faster than the largest: the step up stops at a multiple of the largest's capacity
    high = policy.trace(plan, mu_largest=100.0, mu_smallest=600.0)[1].rate
    assert high == policy.OVER_LARGEST * 100.0 < policy.MAX_UTILIZATION * 600.0


def test_the_edge_gets_a_cpu_of_its_own_when_there_are_two():
    assert policy.placement([3, 0, 1]) == ([3], [0, 1])
    assert policy.placement([0]) == ([0], [0])


def test_late_and_failed_requests_count_as_wrong():
    outcomes = [
        Outcome("a", 0.0, 5.0, "big", "OK"),
        Outcome("a", 0.1, 50.0, "big", "OK"),
        Outcome("a", 0.2, 5.0, "small", "OK", send_lag_ms=2.0),
        Outcome("a", 0.3, 1.0, "", "RESOURCE_EXHAUSTED"),
    ]
    scored = policy.score(outcomes, {"big": 0.9, "small": 0.8}, slo_ms=10.0)
    assert scored["slo_attainment"] == 0.5 and scored["failed"] == 1
    assert scored["late_at_send"] == 1 and scored["late_at_send_and_over_slo"] == 0  # sent 2 ms late, on time
    assert abs(scored["effective_accuracy"] - (0.9 + 0.8) / 4) < 1e-12


def test_a_tiny_policy_benchmark_runs_three_replays_on_a_real_edge(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(policy, "QUICK", TINY)
    out = tmp_path / "policy.json"
    assert main(["policy", "--json", str(out), "--quick", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert KEYS <= set(result["summary"]) and result["summary"]["load_steps"] == 4
    assert set(result["runs"]) == {"adaptive", "fixed_largest", "fixed_smallest"}
    for run in result["runs"].values():
        assert 0 <= run["late_at_send_and_over_slo"] <= run["late_at_send"] <= run["requests"]
        assert set(run["edge_gc_collections"]) == {"0", "1", "2"} and run["edge_gc_collections"]["0"] >= 0
        assert run["requests"] - run["failed"] <= run["edge_answered"] <= run["requests"]  # a timed-out one may count
        assert run["slo_attainment"] <= run["edge_within_slo"] <= 1  # the edge's clock starts later
        assert run["requests"] > 0 and 0 <= run["slo_attainment"] <= 1 and 0 <= run["effective_accuracy"] <= 1
    assert result["runs"]["fixed_largest"]["switches"] <= 1  # pinned: at most the pin itself
    assert all(0 < v["accuracy"] < 1 for v in result["variants"])
    edge_cpus, others = result["placement"]["edge_cpus"], result["placement"]["cloud_and_load_cpus"]
    assert len(edge_cpus) == 1 and (set(edge_cpus).isdisjoint(others) or len(os.sched_getaffinity(0)) == 1)
    assert os.sched_getaffinity(0) == set(edge_cpus) | set(others)  # this process is unpinned again
    assert gc.isenabled()  # off during the replays only
    assert result["capacity_rps"]["largest"] > 0 and result["capacity_rps"]["smallest"] > 0
    assert [v["name"] for v in result["variants"]] == ["vgg11-synflow-1x", "vgg11-synflow-16x"]
    step = result["step_up_load"]  # whichever bound is lower
    assert step["smallest"] <= policy.MAX_UTILIZATION + 1e-9 and step["largest"] <= policy.OVER_LARGEST + 1e-9
    assert min(abs(step["smallest"] - policy.MAX_UTILIZATION), abs(step["largest"] - policy.OVER_LARGEST)) < 1e-9
    ort = result["onnxruntime"]  # the same portfolio on ONNX Runtime edges, without and with int8 members
    assert ORT_KEYS <= set(result["summary"]) and set(ort["runs"]) == {"fp32", "int8"}
    fp32, int8 = ort["runs"]["fp32"]["variants"], ort["runs"]["int8"]["variants"]
    assert {v["precision"] for v in fp32} == {"float32"} and len(fp32) == 2
    assert {v["precision"] for v in int8} == {"float32", "int8"} and len(int8) == 4
    assert all(0 < v["accuracy"] < 1 and v["p50_ms_batch"] > 0 for v in int8)  # every member measured and profiled
    for run in ort["runs"].values():
        assert run["requests"] > 0 and 0 <= run["slo_attainment"] <= 1 and 0 <= run["effective_accuracy"] <= 1
    assert ort["slo_ms"] > 0 and [p["name"] for p in ort["trace"]] == ["steady", "step up", "burst", "step down"]
