"""The process cluster's parts: CPU placement, ports, Prometheus config, detached processes, reports,
its certificates; and `cluster up` itself speaking mutual TLS, every edge on a certificate of its own."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import wait_for

from cloud.admin import certs, operator_client
from cloud.build.store import PortfolioStore
from cloud.localfleet import chart, cluster, cluster_certs, cluster_load, demo_report, detached, plots
from cloud.localfleet.cluster import ClusterConfig, EdgeSpec
from cloud.localfleet.detached import Proc
from cloud.localfleet.loadgen import Phase, Sample
from common import security
from common.identity import Identity, certificate_identity, peer_identity
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc, inference_pb2_grpc

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


# --- certificates and `cluster up` over mutual TLS -------------------------------------------------------
def _identity(holder: Path) -> Identity | None:
    return certificate_identity((holder / security.CERT).read_bytes())


def test_the_cluster_certificates_are_kept_across_runs_and_each_edge_gets_its_own(tmp_path):
    keys = cluster_certs.prepare(tmp_path / "certs", ["edge-a", "edge-b"], "127.0.0.1")
    kept = {path: (keys.root / path).read_bytes() for path in cluster_certs.KEPT}
    first_edge = (keys.edge("edge-a") / security.CERT).read_bytes()
    assert _identity(keys.edge("edge-a")) == Identity("edge", "edge-a")
    assert _identity(keys.edge("edge-b")) == Identity("edge", "edge-b")
    assert _identity(keys.client) == Identity("client", cluster_certs.LOAD_CLIENT)
    assert _identity(keys.operator).role == "operator" and _identity(keys.cloud) == Identity("cloud")
    assert (keys.edge("edge-a") / security.KEY).stat().st_mode & 0o077 == 0
    again = cluster_certs.prepare(tmp_path / "certs", ["edge-a", "edge-c"], "127.0.0.1")
    assert {path: (again.root / path).read_bytes() for path in cluster_certs.KEPT} == kept
    assert (again.edge("edge-a") / security.CERT).read_bytes() != first_edge  # issued afresh
    assert _identity(again.edge("edge-c")) == Identity("edge", "edge-c")
    (again.operator / security.TOKEN).unlink()  # an interrupted first run: the set is made again, whole
    third = cluster_certs.prepare(tmp_path / "certs", ["edge-a"], "127.0.0.1")
    assert third.complete() and (third.ca / security.CA).read_bytes() != kept[f"ca/{security.CA}"]


def test_the_load_command_line_reads_the_fleet_as_operator_and_calls_edges_as_a_client(tmp_path):
    keys = cluster_certs.ClusterCerts(tmp_path / "certs")
    config = ClusterConfig(dir=tmp_path)
    args = cluster.cluster_start.load_args(config, "127.0.0.1:1", tmp_path / "store", keys)
    assert args[args.index("--certs") + 1] == str(keys.operator)
    assert args[args.index("--client-certs") + 1] == str(keys.client)
    assert "--insecure" not in args and "--token-file" not in args
    plain = cluster.cluster_start.load_args(ClusterConfig(dir=tmp_path, insecure=True), "h:1", tmp_path, None)
    assert "--insecure" in plain and "--certs" not in plain


@pytest.fixture(scope="module")
def tls_cluster(small_portfolio, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls-cluster")
    config = ClusterConfig(
        dir=directory,
        portfolio=small_portfolio,
        base_port=0,
        edges=(EdgeSpec("edge-a", 0.5), EdgeSpec("edge-b", 0.5)),
        clients=1,
        prometheus="off",
        timeout_s=150,
    )
    state = cluster.up(config)
    try:
        yield state, cluster.certificates(state)
    finally:
        detached.stop(cluster.processes(state)[::-1], grace_s=5)


def _presented(address: str, keys: cluster_certs.ClusterCerts) -> bytes:
    """The certificate (DER) a server presents in the TLS handshake, checked against the cluster's CA."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(keys.ca / security.CA))
    context.load_cert_chain(keys.client / security.CERT, keys.client / security.KEY)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.getpeercert(binary_form=True)


@pytest.mark.integration
def test_up_gives_every_edge_a_certificate_naming_it_and_operators_the_token(tls_cluster):
    state, keys = tls_cluster
    assert keys is not None and Path(state["certs"]) == keys.root
    edges = {p.name: p for p in cluster.processes(state) if p.role == "edge"}
    presented = {}
    for name, proc in edges.items():
        der = _presented(proc.address, keys)
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        assert certificate_identity(pem) == Identity("edge", name)
        assert pem == (keys.edge(name) / security.CERT).read_bytes()
        presented[name] = der
    assert len(set(presented.values())) == len(edges) == 2
    assert cluster.operator_flags(state) == f"--certs {keys.operator}"
    cloud = next(p.address for p in cluster.processes(state) if p.role == "cloud")
    fleet = operator_client.fleet(operator_client.coordinator_stub(cloud, cluster.operator_transport(state)))
    assert {"edge-a", "edge-b"} <= {e.edge for e in fleet.edges}
    with pytest.raises(grpc.RpcError) as plain:
        operator_client.fleet(operator_client.coordinator_stub(cloud, Transport.plaintext()))
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE  # the cloud speaks only mutual TLS


class _Spy(inference_pb2_grpc.InferenceServiceServicer):
    """An InferenceService that records who calls it and with what metadata, and answers nothing."""

    def __init__(self):
        self.calls: list[tuple[Identity | None, dict]] = []
        self.lock = threading.Lock()

    def Predict(self, request, context):
        with self.lock:
            self.calls.append((peer_identity(context), dict(context.invocation_metadata())))
        context.abort(grpc.StatusCode.UNAVAILABLE, "a spy")


@pytest.mark.integration
def test_the_cluster_load_calls_edges_as_a_client_without_the_operator_token(tls_cluster):
    """An edge that joins later gets load too; here that edge records every call it gets."""
    state, keys = tls_cluster
    cloud = next(p.address for p in cluster.processes(state) if p.role == "cloud")
    spy_keys = certs.issue_holder(keys.root, "edge", "spy")
    spy, server = _Spy(), grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(spy, server)
    port = server.add_secure_port("127.0.0.1:0", Transport.load(spy_keys).server_credentials())
    server.start()
    try:
        as_spy = coordinator_pb2_grpc.CoordinatorServiceStub(Transport.load(spy_keys).channel(cloud))
        as_spy.Register(coordinator_pb2.RegisterRequest(edge="spy", address=f"127.0.0.1:{port}"), timeout=10)
        wait_for(lambda: len(spy.calls) >= 3, 60, "the cluster's load at the spy edge", interval_s=0.2)
    finally:
        server.stop(0)
    with spy.lock:
        calls = list(spy.calls)
    assert all(security.AUTHORIZATION not in metadata for _, metadata in calls)
    assert {who for who, _ in calls} == {Identity("client", cluster_certs.LOAD_CLIENT)}


def test_fixed_edges_must_be_named_once_with_an_address():
    for edges in ((("a", "h:1"), ("a", "h:2")), (("a", ""),)):
        with pytest.raises(ValueError, match="fixed edges"):
            cluster_load.LoadConfig(cloud="h:1", edges=edges)


@pytest.mark.integration
def test_a_load_given_its_edges_needs_no_coordinator_and_no_token(small_portfolio, tmp_path):
    """Loaded with a client's certificate only, the coordinator's address closed: every Predict reaches
    the given edge, from the client, without authorization metadata."""
    keys = cluster_certs.prepare(tmp_path / "certs", ["edge-a"], "127.0.0.1")
    spy, server = _Spy(), grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(spy, server)
    port = server.add_secure_port("127.0.0.1:0", Transport.load(keys.edge("edge-a")).server_credentials())
    server.start()
    closed = f"127.0.0.1:{cluster.free_port('127.0.0.1')}"
    config = cluster_load.LoadConfig(
        cloud=closed,
        clients=1,
        batch=1,
        round_s=0.5,
        images=8,
        portfolio=small_portfolio,
        edges=(("edge-a", f"127.0.0.1:{port}"),),
    )
    stop = threading.Event()
    load = threading.Thread(target=cluster_load.run, args=(config, stop, Transport.load(keys.client)), daemon=True)
    load.start()
    try:
        wait_for(lambda: len(spy.calls) >= 3, 60, "Predicts at the given edge", interval_s=0.2)
    finally:
        stop.set()
        load.join(30)
        server.stop(0)
    assert all(security.AUTHORIZATION not in metadata for _, metadata in spy.calls)
    assert {who for who, _ in spy.calls} == {Identity("client", cluster_certs.LOAD_CLIENT)}
