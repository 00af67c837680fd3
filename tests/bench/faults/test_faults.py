"""The faults part of the reliability benchmark against real processes: one cloud and two edges over
mutual TLS, each edge behind its own TCP proxy; the cloud and edges are SIGKILLed mid-transfer,
mid-rollout, mid-download and mid-switch, the coordinator restarted under load and an edge's link cut.
The assertions are the promises themselves, checked from the run's records and again from disk."""

import json
import socket
import threading
import time

import pytest

from bench.faults import run as faults
from bench.net.tcp_proxy import TcpProxy
from cloud.build.store import PortfolioStore
from common.files import atomic_write_json, sha256_file
from common.wire import CHUNK_BYTES

pytestmark = pytest.mark.integration
PLAN = {**faults.QUICK, "cut_s": 5.0, "kill_pause_s": 0.5, "judge_windows": 6, "converge_s": 60.0}


@pytest.fixture(scope="module")
def run(small_portfolio, fashion_mnist, tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    result = faults.run(quick=True, work=work, plan=PLAN, portfolio=small_portfolio)
    atomic_write_json(work / "faults.json", result)  # JSON all the way down
    return work, json.loads((work / "faults.json").read_text())


def _fault(result: dict, name: str) -> dict:
    return next(f for f in result["faults"] if f["name"] == name)


def test_every_fault_is_survived_without_a_failed_request_or_a_corrupt_load(run):
    _, result = run
    summary = result["summary"]
    failing = {
        f["name"]: f.get("error")
        or {
            "checks failed": [k for k, v in f["checks"].items() if not v],
            "failures": f["detail"]["failures"],
            "data_lost": f["data_lost"],
            "corrupt_loads": f["corrupt_loads"],
            "converge_s": f["converge_s"],
        }
        for f in result["faults"]
        if not f["survived"]
    }
    assert summary["faults_total"] == len(faults.SCENARIOS) == 6
    assert summary["faults_survived"] == summary["faults_total"], failing
    assert summary["requests_failed_during_faults"] == 0 and summary["corrupt_loads"] == 0
    for fault in result["faults"]:
        assert fault["requests_sent"] > 20 and fault["converge_s"] is not None  # load ran through it; converged
        assert fault["data_lost"].get("state", []) == []  # nothing the coordinator had is missing after it
        assert not any(fault["data_lost"]["telemetry_requests"].values())  # every answered request is on record
        for audit in fault["detail"]["audits"].values():  # what the edges hold and loaded is verified
            assert audit["loaded"] and not audit["corrupt_files"] and not audit["unverified_loads"]


def test_downloads_cut_by_a_kill_resume_and_a_partial_file_is_never_in_place(run):
    _, result = run
    for name in ("cloud_kill_during_transfer", "edge_kill_during_download"):
        detail = _fault(result, name)["detail"]
        size, kept = detail["variant_bytes"], detail["part_bytes_at_kill"]
        assert size > 2 * CHUNK_BYTES and CHUNK_BYTES <= kept < size  # killed mid-file
        assert 0 < detail["bytes_sent_after"] <= size - kept + CHUNK_BYTES  # resumed, not started over
    killed = _fault(result, "edge_kill_during_download")
    assert killed["requests_failed_while_edge_down"] > 0 and killed["detail"]["edge_down_s"]["edge-2"] > 0


def test_rollouts_carry_on_after_the_cloud_dies_and_every_edge_ends_where_it_is_desired(run):
    _, result = run
    during = _fault(result, "cloud_kill_during_rollout")
    assert during["checks"]["killed while the canary was judged"] and during["detail"]["state_at_kill"] == "canary"
    assert during["checks"]["rollout completed after the restart"]
    cut = _fault(result, "network_cut")
    assert cut["checks"]["policy changed during the cut applied after it"] and cut["detail"]["cut_s"] >= PLAN["cut_s"]
    switch = _fault(result, "edge_kill_during_switch")
    assert switch["checks"]["switching when killed"] and switch["checks"]["back on its pinned variant"]


def test_edge_caches_hold_only_files_that_hash_to_their_names(run, small_portfolio):
    work, _ = run
    base = {v.variant_id for v in PortfolioStore(small_portfolio).manifest().variants}
    for cache in (work / "run" / "cache").iterdir():
        held = {path.stem: sha256_file(path) for path in cache.glob("*.safetensors")}
        assert base <= set(held) and all(name == digest for name, digest in held.items())
        assert not list(cache.glob("*.part"))  # every cut download was finished


def _echo(connection: socket.socket) -> None:
    try:
        while data := connection.recv(1 << 16):
            connection.sendall(data)
    except OSError:
        pass  # reset by the proxy


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(1 << 16) or b""
    return data


@pytest.fixture
def echo_proxy():
    """A proxy in front of an echo server, and a client through it that has echoed 1000 bytes."""
    server, port = _echo_server()
    proxy = TcpProxy(port)
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"x" * 1000)
        assert _read(client, 1000) == b"x" * 1000 and proxy.bytes_up == proxy.bytes_down == 1000
        yield proxy, client
    finally:
        proxy.close()
        server.close()


def test_the_proxy_throttles_cuts_and_resets_what_the_cut_held(echo_proxy):
    proxy, client = echo_proxy
    proxy.throttle(200_000)
    start = time.monotonic()
    client.sendall(b"y" * 200_000)
    assert _read(client, 200_000) == b"y" * 200_000
    assert time.monotonic() - start >= 0.9  # 200 kB at 200 kB/s
    proxy.cut()
    client.sendall(b"lost")
    client.settimeout(1.0)
    with pytest.raises(socket.timeout):
        client.recv(16)  # nothing crosses
    proxy.restore()
    client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        client.recv(16)  # what the cut held is gone with its connection
    fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    fresh.sendall(b"again")
    assert _read(fresh, 5) == b"again"


def test_the_proxy_cuts_after_exactly_the_bytes_it_was_given(echo_proxy):
    proxy, client = echo_proxy
    proxy.cut_after(300, record=True)
    client.sendall(b"b" * 1000)  # echoed in one piece or several: only the first 300 cross
    assert _read(client, 300) == b"b" * 300
    client.settimeout(1.0)
    with pytest.raises(socket.timeout):
        client.recv(16)
    assert proxy.is_cut and proxy.bytes_down == 1300
    proxy.restore()
    fresh = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    fresh.sendall(b"again")
    assert _read(fresh, 5) == b"again" and proxy.bytes_down == 1305
    assert proxy.recorded == b"b" * 300  # what crossed before the cut, and nothing after it
    with pytest.raises(ValueError):
        proxy.cut_after(-1)
