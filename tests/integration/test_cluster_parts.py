"""The process cluster's parts: CPU placement, ports, Prometheus config, detached processes, reports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud.build.store import PortfolioStore
from cloud.localfleet import chart, cluster, cluster_load, demo_report, detached, plots
from cloud.localfleet.cluster import ClusterConfig, EdgeSpec
from cloud.localfleet.detached import Proc
from cloud.localfleet.loadgen import Phase, Sample
from protos import coordinator_pb2

PNG = b"\x89PNG\r\n\x1a\n"


def test_edge_specs_parse_and_refuse_nonsense():
    assert EdgeSpec.parse("edge-a=0.5") == EdgeSpec("edge-a", 0.5)
    assert EdgeSpec.parse("solo") == EdgeSpec("solo", 1.0)
    for bad in ("=1", "edge=zero", "edge=0", "edge=-1", "a b=1"):
        with pytest.raises(ValueError):
            EdgeSpec.parse(bad)
    with pytest.raises(ValueError, match="unique"):
        ClusterConfig(dir=Path("x"), edges=(EdgeSpec("a", 1), EdgeSpec("a", 2)))
    with pytest.raises(ValueError, match="base_port"):
        ClusterConfig(dir=Path("x"), base_port=80)


@pytest.mark.parametrize("cpus", [[0], [0, 1], [0, 1, 2, 3], list(range(16))])
def test_placement_shares_the_first_cpu_and_gives_whole_cpus_their_own(cpus):
    shared, placed = cluster.placement(cluster.DEFAULT_EDGES, cpus)
    assert shared == (cpus[0],)
    (half, half_threads), (one, one_threads), (two, two_threads) = placed
    assert half == shared and half_threads == 1
    assert len(one) == one_threads == 1 and len(two) == two_threads
    assert set(one) | set(two) <= set(cpus)
    if len(cpus) >= 4:  # enough CPUs: nothing shared between the edges of one CPU or more
        assert len(two) == 2 and not set(one) & set(two) and cpus[0] not in set(one) | set(two)


def test_port_layout_from_a_base_or_free_ports():
    config = ClusterConfig(dir=Path("x"), base_port=40000)
    assert cluster._ports(config) == (40000, 40001, 40002, [(40010, 40011), (40012, 40013), (40014, 40015)])
    cloud, metrics, prometheus, edges = cluster._ports(ClusterConfig(dir=Path("x"), base_port=0))
    assert (cloud, metrics, edges) == (0, 0, [(0, 0)] * 3) and 0 < prometheus < 65536


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is missing")
def test_the_written_prometheus_config_is_valid(tmp_path):
    path = tmp_path / "prometheus.yml"
    path.write_text(cluster.prometheus_config("127.0.0.1:9100", ["127.0.0.1:9101", "127.0.0.1:9103"], 0.5))
    result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scrape_interval: 500ms" in path.read_text()


def test_stop_ends_our_process_and_never_touches_a_reused_pid(tmp_path):
    spawned = detached.spawn(
        "sleeper",
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        tmp_path / "sleeper.log",
        affinity=[0],
    )
    detached.wait_for_line(spawned, re.compile("^up$"), 30)
    mine = Proc("sleeper", "test", spawned.process.pid, spawned.started, str(spawned.log))
    impostor = Proc("sleeper", "test", spawned.process.pid, spawned.started - 100, str(spawned.log))
    assert detached.alive(mine) and not detached.alive(impostor)
    assert detached.stop([impostor], grace_s=1) == {"sleeper": "not running"}
    assert spawned.process.poll() is None  # a pid with another start time is someone else's
    assert detached.stop([mine], grace_s=5) == {"sleeper": "stopped"}
    assert not detached.alive(mine) and spawned.process.poll() is not None


def test_stop_kills_what_ignores_sigterm(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    spawned = detached.spawn("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log")
    detached.wait_for_line(spawned, re.compile("^up$"), 30)
    proc = Proc("stubborn", "test", spawned.process.pid, spawned.started, str(spawned.log))
    assert detached.stop([proc], grace_s=0.5) == {"stubborn": "killed"}
    assert not detached.alive(proc)


def test_a_process_that_dies_early_is_an_error_naming_its_log(tmp_path):
    spawned = detached.spawn(
        "broken", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "broken.log"
    )
    with pytest.raises(detached.DetachedError, match="exited with code 3") as err:
        detached.wait_for_line(spawned, re.compile("never"), 30)
    assert "boom" in str(err.value)


def _sample(t, edge="e", latency=10.0, variant="v1"):
    return Sample(t, edge, "steady", latency, variant, "OK")


def test_load_rows_cover_only_finished_seconds_and_carry_the_rest():
    samples = [_sample(100.1), _sample(100.9, latency=30.0), _sample(101.2), _sample(101.5, "f"), _sample(102.3)]
    rows, pending = cluster_load.complete_seconds(samples, now=102.5)
    assert [(r["edge"], r["t"], r["requests"]) for r in rows] == [("e", 100, 2), ("e", 101, 1), ("f", 101, 1)]
    assert pending == [samples[-1]]
    assert rows[0]["p95_ms"] == pytest.approx(29.0) and rows[0]["variant"] == "v1"


def test_pareto_keeps_the_points_nothing_beats():
    points = [(1.0, 0.5), (2.0, 0.7), (2.5, 0.6), (3.0, 0.9), (0.5, 0.1), (3.0, 0.8)]
    assert chart.pareto(points) == [(0.5, 0.1), (1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]


def test_the_demo_report_plots_the_timeline_and_the_frontier(small_portfolio, tmp_path):
    manifest = PortfolioStore(small_portfolio).manifest()
    top, low = manifest.variants[0].variant_id, manifest.variants[-1].variant_id
    samples = [_sample(t / 10, edge, 5.0 + t % 7, top if t < 40 else low) for t in range(80) for edge in ("a", "b")]
    events = [
        coordinator_pb2.EdgeEvent(
            edge=edge,
            event=coordinator_pb2.SwitchEvent(
                timestamp=1000.0 + 4,
                from_variant=top,
                to_variant=low,
                reason="p95 over the SLO",
                reason_code="slo_violation",
            ),
        )
        for edge in ("a", "b")
    ]
    outcome = {
        "slo_ms": 9.0,
        "started": 1000.0,
        "samples": samples,
        "events": events,
        "names": {v.variant_id: v.name for v in manifest.variants},
    }
    demo_report.write(tmp_path, manifest, outcome, [Phase("light", 4, 1), Phase("heavy", 4, 2)], ("a", "b"))
    for name in ("timeline.png", "frontier.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_the_frontier_plot_takes_on_device_latencies(small_portfolio, tmp_path):
    manifest = PortfolioStore(small_portfolio).manifest()
    on_device = {"edge-1": {v.variant_id: 1.0 + i for i, v in enumerate(manifest.variants)}}
    started = time.monotonic()
    plots.frontier(tmp_path / "frontier.png", manifest, on_device)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG and time.monotonic() - started < 30
