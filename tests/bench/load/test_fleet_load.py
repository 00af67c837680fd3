"""The load benchmark at small scale against real processes (a cloud, simulated edges over mutual TLS,
a real agent, the runtime in a subprocess): every window an edge sent is stored, every edge connected,
no Predict failed, RSS sampled all along."""

import pytest
from helpers import variant_store

from bench.load import fleet as fleet_load
from cloud.admin import certs

pytestmark = pytest.mark.integration
SMALL = {
    "edges": 60,
    "procs": 2,
    "ramp_s": 2.0,
    "fleet_s": 5,
    "predict_s": 2.5,
    "warmup_s": 1.0,
    "clients": 6,
    "agent_threads": 1,
    "switches": 300,
    "every": 20,
    "on_demand_switches": 20,
}


def test_a_small_fleet_loses_no_report_and_the_agent_fails_no_request(tmp_path):
    store = variant_store(tmp_path / "store")
    keys = certs.init(tmp_path / "certs")
    result = fleet_load.measure(store, keys, tmp_path / "run", SMALL, data_dir=None)
    summary = fleet_load.summary(result)

    fleet = result["fleet"]
    assert fleet["sent"] == SMALL["edges"] * SMALL["fleet_s"]  # every edge sent every window
    assert fleet["stored"] == fleet["sent"] and fleet["dropped"] == 0 and fleet["unexpected_rows"] == 0
    assert fleet["edges_connected"] == fleet["connected_midway"] == SMALL["edges"]  # the coordinator saw them all
    assert fleet["reports_per_s"] > 0 and fleet["cloud_samples"]

    predict = result["predict"]
    assert predict["answered"] > 0 and predict["failed"] == 0
    assert predict["requests"] == predict["answered"] + predict["resource_exhausted"]
    assert predict["p99_ms"] >= predict["p50_ms"] > 0
    assert predict["rss_before_bytes"] > 0 and predict["rss_after_bytes"] > 0 and predict["rss_curve"]

    for part, switches in (("switches", SMALL["switches"]), ("switches_on_demand", SMALL["on_demand_switches"])):
        curve = result[part]["curve"]
        assert [s for s, _ in curve] == sorted(s for s, _ in curve) and curve[-1][0] == switches
        assert all(rss > 0 for _, rss in curve)
    assert result["switches_on_demand"]["on_demand_loads"] == SMALL["on_demand_switches"]  # the budget held
    assert summary["reports_dropped"] == 0 and summary["predict_failed"] == 0
    assert abs(summary["rss_growth_mb_10k_switches"]) < 5
    assert {"reports_per_s", "reports_dropped", "rss_growth_mb_10k_switches", "predict_per_s", "predict_failed"} <= set(
        summary
    )
