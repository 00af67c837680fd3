"""The backends benchmark on a tiny plan: a structured portfolio with int8 members built through the real
build, every variant's torch, ONNX Runtime float32 and int8 forms timed together and measured on the
full test split, a real edge agent per backend, the installed sizes; the record holds what the plan
asks for, its figures follow from its own measurements, and a rerun measures nothing again."""

import json
import statistics

import pytest

from bench.__main__ import main
from bench.suites import backends, backends_env, backends_parts

FORMS = (backends_parts.TORCH, backends_parts.ORT_FP32, backends_parts.ORT_INT8)
TINY = backends.Plan(
    portfolios=(backends.PortfolioPlan("tiny", "vgg11", 0.125, 256, 1, 1, (1.05,), 64),),
    iters=(2, 1, 1),
    rounds=4,
)


def _measured(work) -> dict:
    """Every finished point under `work` and when it was written."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("*.json") if p.parent.name == "tiny"}


def test_a_tiny_backends_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(backends, "QUICK", TINY)
    out = tmp_path / "backends.json"
    args = ["backends", "--json", str(out), "--quick", "--threads", "1"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["threads"] == 1 and result["plan"] == TINY.as_json()
    measured = result["portfolios"]["tiny"]
    variants = measured["variants"]
    assert variants and measured["members"] == 2 * len(variants)  # each float32 variant and its int8 member
    test_images = len(fashion_mnist.test)
    for v in variants:
        assert set(v["latency"]) == set(FORMS) and v["int8"]
        for form in FORMS:
            for batch in TINY.batches:
                spread = v["latency"][form][f"b{batch}"]
                assert spread["q1_ms"] <= spread["p50_ms"] <= spread["q3_ms"] and spread["rounds"] == TINY.rounds
            assert 0.0 <= v[form]["accuracy"] <= 1.0
        for batch in TINY.batches:  # every ratio is this run's own p50s
            torch_ms, fp32_ms, int8_ms = (v["latency"][form][f"b{batch}"]["p50_ms"] for form in FORMS)
            assert v["ort_vs_torch"][f"b{batch}"] == torch_ms / fp32_ms
            assert v["int8_vs_fp32"][f"b{batch}"] == fp32_ms / int8_ms
        fp32 = v[backends_parts.ORT_FP32]
        assert fp32["test_images"] == test_images and fp32["matches_torch"]
        assert fp32["max_abs_diff"] <= backends_parts.TOLERANCE
        # the ONNX file's accuracy is torch's, but for images whose argmax ties broke the other way
        assert abs(fp32["accuracy"] - v["torch"]["accuracy"]) <= fp32["argmax_disagreements"] / test_images
        assert fp32["argmax_disagreements"] <= 2
        assert v["int8_acc_drop_pp"] == 100 * (v["torch"]["accuracy"] - v["ort_int8"]["accuracy"])
        assert v["ort_int8"]["manifest_accuracy"] == pytest.approx(v["ort_int8"]["accuracy"], abs=2 / test_images)
    rss = measured["edge_rss"]
    assert rss["torch"]["members"] == len(variants) and rss["onnxruntime"]["members"] == 2 * len(variants)
    assert rss["torch"]["libtorch_mapped"] and not rss["onnxruntime"]["libtorch_mapped"]
    assert all(e["vmhwm_mb"] >= e["vmrss_mb"] > 0 for e in rss.values())

    summary, env = result["summary"], result["environments"]
    assert summary["variants"] == len(variants)
    assert summary["ort_speedup_b1"] == statistics.median(v["ort_vs_torch"]["b1"] for v in variants)
    assert summary["ort_speedup_b8"] == statistics.median(v["ort_vs_torch"]["b8"] for v in variants)
    assert summary["int8_speedup_b8"] == statistics.median(v["int8_vs_fp32"]["b8"] for v in variants)
    assert summary["int8_max_acc_drop_pp"] == max(v["int8_acc_drop_pp"] for v in variants)
    assert summary["ort_fp32_max_acc_diff_pp"] == max(
        100 * abs(v["ort_fp32"]["accuracy"] - v["torch"]["accuracy"]) for v in variants
    )
    assert summary["ort_fp32_matches_torch"] and summary["ort_fp32_max_abs_diff"] <= backends_parts.TOLERANCE
    assert summary["edge_env_ratio"] == env["edge"]["mb"] / env["edge-onnx"]["mb"]
    assert "torch" in env["edge"]["distributions"] and "torch" not in env["edge-onnx"]["distributions"]
    assert "onnxruntime" in env["edge-onnx"]["distributions"]
    assert summary["edge_rss_mb"]["tiny"] == {b: e["vmrss_mb"] for b, e in rss.items()}
    assert set(summary["targets"]) == {f"{k} {c} {t:g}" for k, (c, t) in backends.TARGETS.items()}
    assert summary["targets"]["edge_env_ratio >= 5"] == (summary["edge_env_ratio"] >= 5)
    assert set(result["cpu"]["flags"]) == set(backends_env.INT8_FLAGS) and result["cpu"]["model"]

    finished = _measured(tmp_path / "backends.work")
    assert {"tiny/timing.json", "tiny/accuracy.json", "tiny/edge-rss.json"} <= set(finished)
    assert main(args) == 0  # a rerun resumes: the portfolio, its timings and accuracies are kept
    assert _measured(tmp_path / "backends.work") == finished
    assert json.loads(out.read_text())["portfolios"] == result["portfolios"]


def test_without_vnni_or_amx_the_int8_speedup_is_reported_but_not_judged(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f\n")
    cpu = backends_env.cpu_int8(cpuinfo)
    assert cpu["model"] == "Some CPU" and not cpu["int8"] and not any(cpu["flags"].values())
    variant = {
        "ort_vs_torch": {"b1": 3.0, "b8": 1.5},
        "int8_vs_fp32": {"b1": 1.1, "b8": 1.2},
        "int8": "id",
        "int8_acc_drop_pp": 0.1,
        "torch": {"accuracy": 0.9},
        "ort_fp32": {"accuracy": 0.9, "max_abs_diff": 1e-6, "matches_torch": True},
    }
    env = {
        "edge": {"mb": 900.0},
        "edge-onnx": {"mb": 100.0},
        "edge_env_ratio": 9.0,
        "edge_env_ratio_without_gpu_libraries": 9.0,
    }
    portfolios = {"p": {"variants": [variant], "edge_rss": {"torch": {"vmrss_mb": 300.0}}}}
    summary = backends.summarize(portfolios, env, cpu)
    assert summary["int8_speedup_b8"] == 1.2 and summary["targets"]["int8_speedup_b8 >= 1.5"] is None
    assert any("VNNI" in note for note in summary["notes"])
    assert summary["targets"]["ort_speedup_b1 >= 2"] is True and summary["targets"]["ort_speedup_b8 >= 1.2"] is True
    assert summary["targets"]["int8_max_acc_drop_pp <= 0.5"] is True and summary["targets"]["edge_env_ratio >= 5"]
    with_vnni = backends.summarize(portfolios, env, {**cpu, "int8": True})
    assert with_vnni["targets"]["int8_speedup_b8 >= 1.5"] is False


def test_a_plan_without_the_summary_batches_is_refused():
    with pytest.raises(backends.PlanError, match="batches"):
        backends.Plan(portfolios=TINY.portfolios, batches=(1, 32), iters=(1, 1))


def test_a_refused_portfolio_is_noted_and_leaves_its_targets_missed():
    env = {"edge": {"mb": 900.0}, "edge-onnx": {"mb": 100.0}, "edge_env_ratio": 9.0}
    env["edge_env_ratio_without_gpu_libraries"] = 9.0
    refused = {"demo": {"refused": "speedups: 3x is beyond vgg11 on this CPU", "variants": [], "edge_rss": {}}}
    summary = backends.summarize(refused, env, {"int8": True, "reason": ""})
    assert summary["variants"] == 0 and summary["ort_fp32_matches_torch"] is None
    assert any("demo: the build refused: speedups: 3x" in note for note in summary["notes"])
    assert summary["targets"]["ort_speedup_b1 >= 2"] is False and summary["targets"]["edge_env_ratio >= 5"] is True
