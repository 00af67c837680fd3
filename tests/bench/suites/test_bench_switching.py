"""The switching benchmark on a tiny plan: the JSON holds every figure and nothing failed."""

import json

from bench.__main__ import main
from bench.suites import switching

TINY = {
    "model": "vgg11",
    "width": 0.25,
    "sparsities": (0.95, 0.99),
    "switches": 200,
    "reloads": 5,
    "concurrent_switches": 1000,
    "clients": 2,
    "grpc_requests": 20,
    "peak_switches": 2,
    "threads": 1,
}
KEYS = {
    "switch_p99_us",
    "reload_p50_ms",
    "switch_speedup",
    "failed_requests",
    "memory_ratio",
    "param_bytes_ratio",
    "grpc_overhead_p50_ms",
}
ORT_KEYS = {f"{key}_ort" for key in ("switch_p99_us", "reload_p50_ms", "failed_requests", "grpc_overhead_p50_ms")}
STEPS = {"client_to_arrival", "arrival_to_handler", "before_forward", "forward", "after_forward", "handler_to_client"}


def test_a_tiny_switching_benchmark_reports_every_figure_and_fails_no_request(tmp_path, monkeypatch):
    monkeypatch.setattr(switching, "QUICK", TINY)
    out = tmp_path / "switching.json"
    assert main(["switching", "--json", str(out), "--quick", "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert KEYS | ORT_KEYS <= set(summary)
    assert summary["failed_requests"] == 0 and summary["wrong_answers"] == 0
    assert summary["failed_requests_ort"] == 0 and summary["wrong_answers_ort"] == 0  # ONNX Runtime too
    assert result["onnxruntime"]["under_load"]["switches"] == 1000 and summary["requests_during_switches_ort"] > 0
    for grpc in (result["grpc"], result["onnxruntime"]["grpc"]):
        steps = grpc["steps"]["per_request"]
        assert set(steps["steps_ms"]) == STEPS and all(s["p50"] >= 0 for s in steps["steps_ms"].values())
        assert 0 < grpc["overhead_p50_ms"] < grpc["grpc_ms"]["p99"]  # a round trip less its own forward pass
        assert set(grpc["steps"]["servers_us"]) >= {"sync_16_workers", "aio", "direct_call"}
        assert grpc["steps"]["in_process_us"]["forward"] > 0
    assert result["under_load"]["switches"] == 1000 and result["under_load"]["answered"] > 0
    assert summary["switch_speedup"] == summary["reload_p50_ms"] * 1e3 / summary["switch_p50_us"]
    memory = result["memory"]
    assert memory["sparse"]["param_bytes"] > memory["compact"]["param_bytes"] > 0  # pruning removed channels
    assert summary["param_bytes_ratio"] == memory["sparse"]["param_bytes"] / memory["compact"]["param_bytes"]
    assert all(p["two_variants_bytes"] > 0 for p in memory["switch_peaks"])
    assert all(e["max_abs_diff"] <= 1e-4 for e in result["portfolio"])
    assert all(e["onnx"].endswith(".onnx") for e in result["portfolio"])  # exported and checked, kept
    assert "accuracy is not measured" in result["note"]
    before = [(tmp_path / "switching.work" / e["compact"]).stat().st_mtime for e in result["portfolio"]]
    assert switching.build_portfolio(TINY, tmp_path / "switching.work") == result["portfolio"]  # cached
    assert before == [(tmp_path / "switching.work" / e["compact"]).stat().st_mtime for e in result["portfolio"]]
