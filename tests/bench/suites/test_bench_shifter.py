"""The shifter benchmark: a real (tiny) IMP run, sparse vs compact per level, and its figures."""

import json

from bench.__main__ import main
from bench.suites import shifter

TINY = {
    "model": "vgg11",
    "width": 0.125,
    "subset": 256,
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
    summary = result["summary"]
    assert summary["max_acc_delta_pp"] == 0.0 and summary["levels"] == 3
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
