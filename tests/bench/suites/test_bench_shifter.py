"""The shifter benchmark: a real (tiny) IMP run, sparse vs compact per level, and its figures."""

import json

from bench.__main__ import main
from bench.suites import shifter

TINY = {
    "model": "vgg11",
    "width": 0.125,
    "subset": 256,
    "test_subset": 1000,
    "epochs": 1,
    "levels": 2,
    "rate": 0.8,
    "rewind_iteration": 2,
    "iters": 2,
}


def test_a_tiny_shifter_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(shifter, "QUICK", TINY)
    out = tmp_path / "shifter.json"
    assert main(["shifter", "--json", str(out), "--quick", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert [p["level"] for p in result["points"]] == [0, 1, 2]
    assert all(p["compact_accuracy"] == p["sparse_accuracy"] for p in result["points"])
    assert all(
        p[f"{who}{form}_b{b}_ms"] > 0
        for p in result["points"]
        for who in ("sparse", "compact")
        for form in ("", "_as_loaded")
        for b in (1, 32)
    )  # as served and as loaded
    dense = result["points"][0]  # level 0 is the dense model, timed beside every level
    for p in result["points"]:
        assert p["dense_accuracy"] == dense["sparse_accuracy"]
        assert p["acc_vs_dense_pp"] == 100 * (p["compact_accuracy"] - dense["sparse_accuracy"])
        assert p["speedup_b32_vs_dense"] == p["dense_b32_ms"] / p["compact_b32_ms"]
        assert p["speedup_b1_vs_dense"] == p["dense_b1_ms"] / p["compact_b1_ms"]
        assert p["speedup_b32_as_loaded_vs_dense"] == p["dense_as_loaded_b32_ms"] / p["compact_as_loaded_b32_ms"]
        assert p["macs_ratio_vs_dense"] == p["macs_dense"] / p["macs_compact"] >= 1
    assert dense["acc_vs_dense_pp"] == 0.0 and dense["macs_ratio_vs_dense"] == 1.0
    summary = result["summary"]
    assert summary["max_acc_delta_pp"] == 0.0 and summary["levels"] == 3
    assert summary["dense_accuracy"] == dense["sparse_accuracy"]
    assert summary["speedup_within_1pp_vs_dense"] == shifter.within_vs_dense(result["points"], 1.0)
    assert summary["speedup_within_0_5pp_vs_dense"] >= dense["speedup_b32_vs_dense"]  # the dense level qualifies
    assert (
        summary["derive_s"] > 0
        and summary["generation_speedup"] == summary["train_from_scratch_s"] / summary["derive_s"]
    )
    assert (tmp_path / "shifter-accuracy-params.png").stat().st_size > 0
    assert (tmp_path / "shifter-accuracy-latency.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "shifter.work").glob("level-*.pt")) == [f"level-{i}.pt" for i in range(3)]
    assert sorted(p.name for p in (tmp_path / "shifter.work").glob("scratch-*.json")) == [
        f"scratch-{i}.json" for i in range(3)
    ]
    assert main(["shifter", "--json", str(out), "--quick", "--threads", "1"]) == 0  # resumes: nothing trains again
    again = json.loads(out.read_text())
    assert [p["scratch_accuracy"] for p in again["points"]] == [p["scratch_accuracy"] for p in result["points"]]
    assert again["summary"]["train_from_scratch_s"] == summary["train_from_scratch_s"]


def test_summary_takes_the_worst_delta_and_the_best_ratios():
    points = [
        {"acc_delta_pp": 0.0, "params_ratio": 1.0, "speedup_b32": 1.0, "speedup_b32_as_loaded": 1.1},
        {"acc_delta_pp": -0.05, "params_ratio": 6.0, "speedup_b32": 1.8, "speedup_b32_as_loaded": 1.3},
    ]
    summary = shifter.summarize(points, derive_s=2.0, scratch_s=100.0)
    assert summary["max_acc_delta_pp"] == 0.05 and summary["best_params_ratio"] == 6.0
    assert summary["best_speedup_b32"] == 1.8 and summary["generation_speedup"] == 50.0
    assert summary["best_speedup_b32_as_loaded"] == 1.3
    assert summary["speedup_within_0_5pp_vs_dense"] is None  # points measured without the dense model


def test_the_speedups_over_the_dense_model_are_taken_within_each_accuracy_budget():
    points = [
        {"acc_vs_dense_pp": acc, "speedup_b32_vs_dense": speedup, "dense_accuracy": 0.9}
        | {"acc_delta_pp": 0.0, "params_ratio": 1.0, "speedup_b32": 1.0, "speedup_b32_as_loaded": 1.0}
        for acc, speedup in ((0.0, 1.0), (0.3, 1.5), (-0.5, 2.0), (-0.9, 3.0), (-2.0, 5.0))
    ]
    summary = shifter.summarize(points, derive_s=1.0, scratch_s=1.0)
    assert summary["speedup_within_0_5pp_vs_dense"] == 2.0 and summary["speedup_within_1pp_vs_dense"] == 3.0
    assert summary["best_speedup_b32_vs_dense"] == 5.0 and summary["dense_accuracy"] == 0.9
