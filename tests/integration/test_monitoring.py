"""`prunefleet cluster up|status|down` as users run it, watched by a real Prometheus.

Every PromQL expression of the Grafana dashboard runs against that Prometheus and must return data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import wait_for

from cloud.localfleet import detached
from cloud.localfleet.detached import Proc

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "prunefleet.json"
PRUNEFLEET = [sys.executable, "-m", "cloud.cli", "cluster"]
EDGES = ("edge-1", "edge-2", "edge-3")
NO_PROMETHEUS = "the prometheus binary is missing: 'apt-get install prometheus' (make test installs it as root)"


def _cli(*args, check=True, timeout=300):
    result = subprocess.run([*PRUNEFLEET, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def cluster(small_portfolio, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cluster")
    _cli(
        "up",
        "--dir",
        str(directory),
        "--portfolio",
        str(small_portfolio),
        "--base-port",
        "0",
        "--scrape-interval-s",
        "1",
        "--clients",
        "1",
        "--timeout-s",
        "120",
        "--insecure",
    )
    try:
        yield directory, json.loads((directory / "cluster.json").read_text())
    finally:
        if (directory / "cluster.json").exists():
            _cli("down", "--dir", str(directory), "--no-report", "--grace-s", "5", check=False)


def _query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        reply = json.load(r)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _prometheus(state: dict) -> str:
    if not state["prometheus_url"]:
        assert shutil.which("prometheus") is None, "prometheus is installed but the cluster did not start it"
        pytest.skip(NO_PROMETHEUS)
    return state["prometheus_url"]


def test_up_starts_every_process_pinned_and_the_status_shows_them(cluster):
    directory, state = cluster
    procs = {p["name"]: p for p in state["processes"]}
    assert {"cloud", "load", *EDGES} <= set(procs)
    for name in EDGES:
        assert os.sched_getaffinity(procs[name]["pid"]) == set(procs[name]["affinity"])
        assert procs[name]["threads"] == len(procs[name]["affinity"]) and procs[name]["address"]
    assert [procs[n]["cpus"] for n in EDGES] == [0.5, 1.0, 2.0]
    status = _cli("status", "--dir", str(directory)).stdout
    assert "DEAD" not in status and all(f"{name}  live" in status for name in EDGES)
    again = _cli("up", "--dir", str(directory), "--base-port", "0", "--insecure", check=False)
    assert again.returncode == 1 and "cluster down" in again.stderr


def test_prometheus_scrapes_every_target_up(cluster):
    _, state = cluster
    url = _prometheus(state)
    metrics = {p["metrics_address"] for p in state["processes"] if p["role"] in ("cloud", "edge")}
    assert len(metrics) == 1 + len(EDGES)

    def all_up():
        result = _query(url, "up")
        return {r["metric"]["instance"] for r in result if r["value"][1] == "1"} == metrics and result

    result = wait_for(all_up, 60, "every target up == 1", interval_s=0.5)
    assert {r["metric"]["job"] for r in result} == {"prunefleet-cloud", "prunefleet-edge"}


def _expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_expression_returns_data(cluster):
    _, state = cluster
    url = _prometheus(state)
    wait_for(
        lambda: len([r for r in _query(url, "up") if r["value"][1] == "1"]) == 1 + len(EDGES),
        60,
        "every target up",
        interval_s=0.5,
    )
    expressions = _expressions()
    assert len(expressions) >= 10

    def answered(expr):
        result = _query(url, expr)
        edges = {r["metric"]["edge"] for r in result if "edge" in r["metric"]}
        finite = [r for r in result if not math.isnan(float(r["value"][1]))]
        # a per-edge expression must cover every edge, with a number (not NaN) for each
        return finite and (not edges or {r["metric"]["edge"] for r in finite} == set(EDGES)) and result

    for title, expr in expressions:
        wait_for(lambda: answered(expr), 60, f"data for panel {title!r}: {expr}", interval_s=1.0)  # noqa: B023 - called before the loop moves on


def test_status_reports_a_dead_process_and_down_stops_the_rest_and_writes_the_report(cluster):
    directory, state = cluster
    load = next(p for p in state["processes"] if p["role"] == "load")
    os.kill(load["pid"], signal.SIGKILL)
    wait_for(lambda: _cli("status", "--dir", str(directory), check=False).returncode == 1, 10, "status sees it")
    status = _cli("status", "--dir", str(directory), check=False).stdout
    assert "DEAD" in status and "load" in status
    down = _cli("down", "--dir", str(directory), "--grace-s", "5").stdout
    assert "not running" in down and "stopped" in down
    assert not (directory / "cluster.json").exists()
    for name in ("latency.png", "frontier.png"):
        assert (directory / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((directory / "report" / "report.json").read_text())
    assert set(report["settled"]) == set(EDGES) and all(report["settled"].values())
    assert set(report["per_second"]) == set(EDGES) and all(report["per_second"][e] for e in EDGES)
    assert not any(detached.alive(Proc.from_json(p)) for p in state["processes"])
    assert "no cluster" in _cli("status", "--dir", str(directory), check=False).stderr
