"""The reconvene benchmark on a tiny plan: every point trains both models for real; the summary is
what the points say."""

import json

import pytest

from bench.__main__ import main
from bench.suites import reconvene

TINY = {
    "model": "vgg11",
    "width": 0.125,
    "subset": 256,
    "test_subset": 1000,
    "epochs": 1,
    "rounds": 10,
    "iters": 2,
    "points": [["synflow", 4], ["synflow", 16], ["snip", 16]],
    "sweep": {"scorer": "synflow", "compression": 16, "thresholds": [0.1, 1.0]},
    "coverage_sweep": {"scorer": "synflow", "compressions": [16], "coverages": [0.0, 0.8]},
    "seeds": [0, 1],
    "timing": ["resnet20"],
}


def test_a_tiny_reconvene_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(reconvene, "QUICK", TINY)
    out = tmp_path / "reconvene.json"
    assert main(["reconvene", "--json", str(out), "--quick", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    points = result["points"]
    assert [(p["scorer"], p["compression"]) for p in points] == [
        ("synflow", 4),
        ("synflow", 16),
        ("snip", 16),
    ]
    for p in points:
        assert 0 < p["acc_reconvene"] <= 1 and 0 < p["acc_unstructured"] <= 1
        # two seeds, paired: the point's accuracies and gap are their means
        assert [r["seed"] for r in p["seeds"]] == [0, 1]
        assert p["acc_gap_pp"] == pytest.approx(sum(r["acc_gap_pp"] for r in p["seeds"]) / 2)
        assert p["acc_unstructured"] == pytest.approx(sum(r["acc_unstructured"] for r in p["seeds"]) / 2)
        assert p["acc_gap_pp_worst_seed"] == max(r["acc_gap_pp"] for r in p["seeds"])
        first, second = (r["acc_gap_pp"] for r in p["seeds"])
        assert p["acc_gap_pp_sem"] == pytest.approx(abs(first - second) / 2)  # stdev of two / sqrt(2)
        assert p["params_reconvene"] <= p["params_dense"] and p["bytes_reconvene"] <= p["bytes_unstructured"]
        assert p["groups_structured"] == sum(d["insensitive"] for d in p["decisions"])
        assert p["prune_s"] == p["score_s"] + p["structure_s"]
        # against the dense model of each seed, the same for every point
        assert [r["acc_dense"] for r in p["seeds"]] == [r["acc_dense"] for r in points[0]["seeds"]]
        for r in p["seeds"]:
            assert r["acc_vs_dense_pp"] == pytest.approx(100 * (r["acc_reconvene"] - r["acc_dense"]))
        assert p["acc_vs_dense_pp"] == pytest.approx(sum(r["acc_vs_dense_pp"] for r in p["seeds"]) / 2)
        assert p["speedup_b32_vs_dense"] == p["dense_b32_ms"] / p["reconvene_b32_ms"]
        assert p["speedup_b32_as_loaded_vs_dense"] == p["dense_as_loaded_b32_ms"] / p["reconvene_as_loaded_b32_ms"]
        assert p["macs_ratio_vs_dense"] >= 1
    # at coverage 0 the density alone decides: the sparsest groups are pruned structurally
    free, default = result["coverage_sweep"]
    assert (free["coverage"], default["coverage"]) == (0.0, 0.8)
    assert free["params_reconvene"] < free["params_dense"] / 2 and free["groups_structured"] > 0
    assert default == reconvene.first_seed(points[1])  # the default is the point itself, as its first seed trained it
    assert default["acc_reconvene"] == points[1]["seeds"][0]["acc_reconvene"]
    assert free["acc_dense"] == default["acc_dense"] == points[1]["seeds"][0]["acc_dense"]  # one dense model a seed
    summary = result["summary"]
    assert summary["max_acc_gap_pp"] == max(p["acc_gap_pp"] for p in points)
    assert summary["best_params_ratio"] == max(p["params_ratio"] for p in points)
    assert summary["prune_s_max"] == max(p["prune_s"] for p in points) and summary["points"] == 3
    assert result["timing"][0]["model"] == "resnet20" and 0 < summary["prune_epoch_ratio"]
    assert [s["threshold"] for s in result["sweep"]] == [0.1, 1.0]
    assert summary["seeds"] == 2
    assert summary["max_acc_gap_pp_worst_seed"] == max(p["acc_gap_pp_worst_seed"] for p in points)
    assert summary["seed_spread_pp"] == max(p["acc_unstructured_range_pp"] for p in points)
    assert summary["acc_dense"] == points[0]["acc_dense"]
    assert summary["best_speedup_b32_vs_dense"] == max(p["speedup_b32_vs_dense"] for p in points)
    assert summary["speedup_within_1pp_vs_dense"] == max(
        (p["speedup_b32_vs_dense"] for p in points if p["acc_vs_dense_pp"] >= -1.0), default=None
    )
    work = tmp_path / "reconvene.work"
    assert sorted(p.name for p in work.glob("dense-seed*.pt")) == ["dense-seed0.pt", "dense-seed1.pt"]
    trained = {p.name: p.stat().st_mtime_ns for p in work.glob("dense-seed*")}
    assert (tmp_path / "reconvene-accuracy-params.png").stat().st_size > 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "reconvene.work").glob("point-*.json")}
    assert len(mtimes) == 6  # each point and seed is kept on its own
    assert main(["reconvene", "--json", str(out), "--quick", "--threads", "1"]) == 0  # resumes: nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "reconvene.work").glob("point-*.json")} == mtimes
    assert json.loads(out.read_text())["points"] == points
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("dense-seed*")} == trained


def test_summary_counts_points_within_half_a_point():
    points = [
        {"acc_gap_pp": 0.2, "params_ratio": 10.0, "speedup_b32": 1.5, "speedup_b32_as_loaded": 1.2, "prune_s": 1.0},
        {"acc_gap_pp": 2.0, "params_ratio": 40.0, "speedup_b32": 3.0, "speedup_b32_as_loaded": 2.5, "prune_s": 2.0},
    ]
    summary = reconvene.summarize(points, [{"prune_epoch_ratio": 0.03}])
    assert summary["max_acc_gap_pp"] == 2.0 and summary["best_params_ratio"] == 40.0
    assert summary["best_speedup_b32_as_loaded"] == 2.5
    assert summary["best_params_ratio_within_0_5pp"] == 10.0 and summary["best_speedup_b32_within_0_5pp"] == 1.5
    assert summary["points_within_0_5pp"] == 1 and summary["prune_epoch_ratio"] == 0.03
    assert summary["speedup_within_1pp_vs_dense"] is None  # measured without the dense model
    against = [
        p | {"acc_dense": 0.9, "acc_vs_dense_pp": pp, "speedup_b32_vs_dense": x}
        for p, pp, x in zip(points, (-0.4, -0.8), (2.0, 4.0))
    ]
    summary = reconvene.summarize(against, [])
    assert summary["speedup_within_0_5pp_vs_dense"] == 2.0 and summary["speedup_within_1pp_vs_dense"] == 4.0
    assert summary["acc_dense"] == 0.9 and summary["best_speedup_b32_vs_dense"] == 4.0
    refused = reconvene.summarize(
        [*points, {"scorer": "magnitude", "compression": 32, "refused": "layer collapse"}], []
    )
    assert refused["points"] == 2 and refused["points_refused"] == 1 and refused["max_acc_gap_pp"] == 2.0


def test_a_later_seed_refused_is_left_out_of_the_means_and_counted():
    from bench.suites.reconvene import SEED_KEYS, over_seeds

    def run(seed, acc_u, acc_r):
        return {k: 0 for k in SEED_KEYS} | {
            "seed": seed,
            "acc_unstructured": acc_u,
            "acc_reconvene": acc_r,
            "acc_gap_pp": 100 * (acc_u - acc_r),
        }

    runs = [run(0, 0.90, 0.89), {"seed": 1, "refused": "too few weights"}, run(2, 0.92, 0.90)]
    point = over_seeds(runs)
    assert point["seeds_refused"] == 1 and [s["seed"] for s in point["seeds"]] == [0, 2]
    assert point["acc_reconvene"] == pytest.approx(0.895) and point["acc_gap_pp"] == pytest.approx(1.5)
    alone = over_seeds([run(0, 0.9, 0.89), {"seed": 1, "refused": "too few weights"}])
    assert alone["seeds_refused"] == 1 and alone["acc_reconvene"] == 0.89
    assert "seeds_refused" not in over_seeds([run(0, 0.9, 0.89), run(1, 0.91, 0.9)])
