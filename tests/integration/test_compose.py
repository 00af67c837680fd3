"""The docker-compose cluster and what it mounts: compose file, images, Prometheus and Grafana files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cloud.service.server import CloudConfig, start
from common.security import Transport
from edge.metrics import EdgeMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "prunefleet.json"
SERVICES = {"certs", "trainer", "cloud", "policy", "edge-1", "edge-2", "edge-3", "loadgen", "prometheus", "grafana"}
EDGES = ("edge-1", "edge-2", "edge-3")
LONG_RUNNING = {"cloud", "edge-1", "edge-2", "edge-3", "prometheus", "grafana"}


def _compose() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("docker-compose is missing: 'apt-get install docker-compose' (make test installs it as root)")


def _blocks(rendered: str) -> dict[str, str]:
    """The rendered config's text per service (services sit at two spaces under `services:`)."""
    start = re.search(r"^services:\n", rendered, flags=re.M)
    body = re.split(r"\n(?=\S)", rendered[start.end() :], maxsplit=1)[0]
    parts = re.split(r"^  ([\w.-]+):\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def rendered() -> str:
    result = subprocess.run(
        [*_compose(), "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_docker_compose_config_validates_the_topology(rendered):
    blocks = _blocks(rendered)
    assert set(blocks) == SERVICES
    for name, block in blocks.items():
        assert "restart:" in block, f"{name} has no restart policy"
    for name in LONG_RUNNING:
        assert "healthcheck:" in blocks[name], f"{name} has no health check"
    cpus = [float(re.search(r"cpus: ([\d.]+)", blocks[f"edge-{i}"]).group(1)) for i in (1, 2, 3)]
    assert len(set(cpus)) == 3, "the edges need different CPU limits"
    assert "service_completed_successfully" in blocks["cloud"] and "service_healthy" in blocks["loadgen"]


def _mounts(block: str) -> dict[str, str]:
    """Named volume -> where the service mounts it (bind mounts of ./ paths are left out)."""
    return dict(re.findall(r"^\s+- ([a-z][\w-]*):(/[^\s:]*)", block, flags=re.M))


def test_every_holder_mounts_only_its_own_certificates(rendered):
    blocks = _blocks(rendered)
    mounts = {name: _mounts(block) for name, block in blocks.items()}
    certificates = {name: {v for v in found if v.startswith("certs-")} for name, found in mounts.items()}
    for edge in EDGES:
        assert certificates[edge] == {f"certs-{edge}"}, f"{edge} mounts {certificates[edge]}"
        assert f"--name\n    - {edge}\n" in blocks[edge] and "--certs" in blocks[edge]
    issued = re.search(r"for edge in ([\w .-]+); do prunefleet certs issue edge \$+edge", blocks["certs"])
    assert issued and set(issued.group(1).split()) == set(EDGES), "the certs job issues every edge its own"
    assert certificates["cloud"] == {"certs-cloud"} and certificates["loadgen"] == {"certs-loadgen"}
    assert certificates["policy"] == {"certs-operator"}
    # the operator token is in the operator's directory and the cloud's (which checks it): no edge, no
    # load generator gets either; the CA's key only the job that issues certificates
    holders = {
        volume: {name for name, found in certificates.items() if volume in found} for volume in certificates["certs"]
    }
    assert holders["certs-operator"] == {"certs", "policy"}
    assert holders["certs-cloud"] == {"certs", "cloud"}
    assert holders["certs-ca"] == {"certs"}
    assert ":ro" in re.search(r"certs-loadgen:\S+", blocks["loadgen"]).group(0)


def test_every_grpc_service_speaks_mutual_tls_and_the_load_needs_no_operator(rendered):
    blocks = _blocks(rendered)
    assert "--insecure" not in rendered
    for name in ("cloud", "loadgen", *EDGES):
        assert "- --certs\n" in blocks[name], f"{name} runs without --certs"
    assert "PRUNEFLEET_CERTS: /var/lib/prunefleet/certs/operator" in blocks["policy"]
    for edge in EDGES:  # the load generator calls each edge by the name its certificate carries
        assert f"- {edge}={edge}:50061\n" in blocks["loadgen"]
    assert re.search(r"certs:\n\s+condition: service_completed_successfully", blocks["cloud"])


def test_the_compose_file_holds_no_secrets():
    text = COMPOSE.read_text()
    assert not re.search(r"(?i)(password|secret|token|api_key|private_key)\s*[:=]", text)
    assert "GF_SECURITY_ADMIN" not in text


def test_the_edge_image_installs_no_cloud_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = " ".join(pyproject["project"]["dependencies"])
    assert "torch-pruning" not in base and "matplotlib" not in base
    extras = " ".join(pyproject["project"]["optional-dependencies"]["cloud"])
    assert "torch-pruning" in extras and "matplotlib" in extras
    edge = (DEPLOY / "edge.Dockerfile").read_text()
    installs = [line for line in edge.splitlines() if "pip install" in line]
    assert any(re.search(r'pip install "\.\[edge\]"$', line) for line in installs)
    assert not any("cloud" in line or "matplotlib" in line or "pruning" in line for line in installs)
    slim = [line for line in (DEPLOY / "Dockerfile.edge-onnx").read_text().splitlines() if "pip install" in line]
    assert any('pip install ".[edge-onnx]"' in line for line in slim) and not any("torch==" in line for line in slim)
    assert 'pip install ".[cloud]"' in (DEPLOY / "cloud.Dockerfile").read_text()


def test_prometheus_scrapes_the_cloud_and_every_edge_service():
    config = (DEPLOY / "prometheus.yml").read_text()
    targets = set(re.findall(r'"([\w.-]+:\d+)"', config))
    assert targets == {"cloud:9100", "edge-1:9101", "edge-2:9101", "edge-3:9101"}
    if shutil.which("promtool"):
        result = subprocess.run(
            ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def _exported_names(store: Path, scratch: Path) -> set[str]:
    """Every sample name the cloud and an edge export, on their own registries."""
    cloud_registry, edge_registry = CollectorRegistry(), CollectorRegistry()
    cloud = start(
        CloudConfig(store=store, transport=Transport.plaintext(), port=0, db=scratch / "fleet.sqlite"), cloud_registry
    )
    try:
        metrics = EdgeMetrics(edge_registry, "edge-1", slo_s=0.05)
        metrics.request("a" * 64, "OK", 0.01)
        metrics.switched("initial", 1e-6, ["a" * 64], "a" * 64)
        metrics.loaded("a" * 64, 0.5, 1000)
        return {s.name for r in (cloud_registry, edge_registry) for m in r.collect() for s in m.samples}
    finally:
        cloud.stop()


def test_the_dashboard_uses_only_exported_metrics_and_covers_the_views(small_portfolio, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:prunefleet|process)_[a-z0-9_]+", e)}
    missing = used - _exported_names(small_portfolio, tmp_path)
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for view in (
        "p95",
        "slo",
        "request rate",
        "active variant",
        "switches by reason",
        "memory",
        "transfer progress",
        "fleet size",
        "resident variants",
        "evictions",
        "on-demand load",
    ):
        assert view in titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"uid: (\S+)", datasource).group(1)
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "prunefleet.yml").read_text()
    assert (
        "/var/lib/grafana/dashboards" in provider
        and "./deploy/grafana/dashboards:/var/lib/grafana/dashboards" in COMPOSE.read_text()
    )
