"""The cloud's gRPC services, served for real on loopback, against a store of real variant files."""

import hashlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import variant_store as _store
from prometheus_client import CollectorRegistry

from cloud.service import server
from cloud.service.report_pace import PaceConfig
from common.security import Transport
from protos import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)


@pytest.fixture()
def cloud(tmp_path):
    store = _store(tmp_path / "store")
    running = server.start(
        server.CloudConfig(store=store.root, transport=Transport.plaintext(), db=tmp_path / "fleet.sqlite"),
        CollectorRegistry(),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield store, channel, running
    channel.close()
    running.stop(0)


def _fetch(channel, variant_id, offset=0) -> bytes:
    stub = portfolio_pb2_grpc.PortfolioServiceStub(channel)
    chunks = list(
        stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id=variant_id, offset=offset), timeout=10)
    )
    assert all(len(c.data) <= 1 << 20 for c in chunks)
    assert all(c.sha256 == variant_id for c in chunks)
    data = b"".join(c.data for c in chunks)
    assert [c.offset for c in chunks] == [offset + sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
    assert {c.total_size for c in chunks} == {offset + len(data)}
    return data


def test_list_and_fetch_whole_and_resumed(cloud):
    store, channel, _ = cloud
    listed = portfolio_pb2_grpc.PortfolioServiceStub(channel).ListVariants(
        portfolio_pb2.ListVariantsRequest(), timeout=5
    )
    assert [v.name for v in listed.variants] == ["vgg11-L0", "vgg11-L1"]
    assert listed.portfolio_id == store.manifest().portfolio_id
    big = listed.variants[0]
    data = _fetch(channel, big.variant_id)
    assert len(data) == big.size_bytes > 1 << 20  # more than one chunk
    assert hashlib.sha256(data).hexdigest() == big.sha256
    assert _fetch(channel, big.variant_id, offset=1000) == data[1000:]


@pytest.mark.parametrize(
    "variant_id, offset, code",
    [
        ("0" * 64, 0, grpc.StatusCode.NOT_FOUND),
        ("../../etc/passwd", 0, grpc.StatusCode.INVALID_ARGUMENT),
        ("", 0, grpc.StatusCode.INVALID_ARGUMENT),
        (None, -1, grpc.StatusCode.OUT_OF_RANGE),
        (None, 1 << 40, grpc.StatusCode.OUT_OF_RANGE),
    ],
)
def test_fetch_bad_requests_get_the_right_status(cloud, variant_id, offset, code):
    store, channel, _ = cloud
    variant_id = store.manifest().variants[0].variant_id if variant_id is None else variant_id
    with pytest.raises(grpc.RpcError) as err:
        _fetch(channel, variant_id, offset)
    assert err.value.code() == code and err.value.details()


def test_health_reports_serving(cloud):
    _, channel, _ = cloud
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "prunefleet.v1.PortfolioService", "prunefleet.v1.CoordinatorService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _register(stub, name="edge-1"):
    return stub.Register(coordinator_pb2.RegisterRequest(edge=name, address="127.0.0.1:1", threads=1), timeout=5)


def test_register_connect_report_and_policy_push(cloud):
    store, channel, _ = cloud
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    reply = _register(stub)
    assert len(reply.variants) == 2 and reply.policy.slo_ms > 0
    vid = reply.variants[0].variant_id
    reports = [
        coordinator_pb2.EdgeReport(
            edge="edge-1", profile=coordinator_pb2.VariantProfile(variant_id=vid, p50_ms_b1=1.0)
        ),
        coordinator_pb2.EdgeReport(edge="edge-1", telemetry=coordinator_pb2.Telemetry(active_variant=vid, p95_ms=7.5)),
        coordinator_pb2.EdgeReport(
            edge="edge-1",
            switch=coordinator_pb2.SwitchEvent(
                timestamp=time.time(), to_variant=vid, reason="initial choice", reason_code="initial"
            ),
        ),
    ]
    sent = iter(reports + [None])

    def requests():
        for report in sent:
            if report is None:
                time.sleep(1.0)  # keep the stream open while the policy changes
                return
            yield report

    stream = stub.Connect(requests(), timeout=10)
    first = next(stream)
    assert first.policy.version == reply.policy.version
    time.sleep(0.3)
    new = stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=12.5)), timeout=5).policy
    assert new.version == first.policy.version + 1 and new.down_windows >= 1
    desired = next(stream)  # once the stream is bound to the edge: the portfolio it should hold
    assert desired.portfolio.portfolio_id == store.manifest().portfolio_id
    assert next(stream).policy.version == first.policy.version  # and its own policy (with its pin, if any)
    assert next(stream).policy.slo_ms == 12.5
    fleet = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)
    (edge,) = fleet.edges
    assert edge.edge == "edge-1" and edge.telemetry.p95_ms == 7.5 and edge.profiles[0].variant_id == vid
    events = stub.ListEvents(coordinator_pb2.ListEventsRequest(), timeout=5).events
    assert [e.event.reason_code for e in events] == ["initial"]


def test_state_survives_a_coordinator_restart(tmp_path):
    store = _store(tmp_path / "store")
    config = server.CloudConfig(store=store.root, transport=Transport.plaintext(), db=tmp_path / "fleet.sqlite")
    first = server.start(config, CollectorRegistry())
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{first.port}"))
    _register(stub, "edge-x")
    stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=33.0)), timeout=5)
    first.stop(0)
    second = server.start(config, CollectorRegistry())
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{second.port}"))
    fleet = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)
    second.stop(0)
    assert [e.edge for e in fleet.edges] == ["edge-x"] and fleet.policy.slo_ms == 33.0


@pytest.mark.parametrize(
    "policy, needle",
    [
        (coordinator_pb2.Policy(slo_ms=-1), "slo_ms"),
        (coordinator_pb2.Policy(slo_ms=10, min_accuracy=2), "min_accuracy"),
        (coordinator_pb2.Policy(slo_ms=10, up_headroom=3), "up_headroom"),
        (coordinator_pb2.Policy(slo_ms=10, pinned_variant="f" * 64), "pinned_variant"),
    ],
)
def test_bad_policy_gets_invalid_argument(cloud, policy, needle):
    _, channel, _ = cloud
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=policy), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_bad_edge_names_and_unregistered_streams_are_refused(cloud):
    _, channel, _ = cloud
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        _register(stub, "../evil")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = stub.Connect(
        iter([coordinator_pb2.EdgeReport(edge="ghost", telemetry=coordinator_pb2.Telemetry())]), timeout=5
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_pins_reach_only_the_selected_edges_and_survive_a_restart(tmp_path):
    store = _store(tmp_path / "store")
    config = server.CloudConfig(store=store.root, transport=Transport.plaintext(), db=tmp_path / "fleet.sqlite")
    first = server.start(config, CollectorRegistry())
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{first.port}"))
    for name in ("edge-1", "edge-2"):
        _register(stub, name)
    small = store.manifest().variants[1].variant_id
    reply = stub.Pin(coordinator_pb2.PinRequest(edges="edge-2", variant_id=small), timeout=5)
    assert list(reply.edges) == ["edge-2"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(coordinator_pb2.PinRequest(edges="edge-1", variant_id="0" * 64), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Pin(coordinator_pb2.PinRequest(edges="ghost", variant_id=small), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    first.stop(0)
    second = server.start(config, CollectorRegistry())
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{second.port}"))
    try:
        assert _register(stub, "edge-2").policy.pinned_variant == small
        assert _register(stub, "edge-1").policy.pinned_variant == ""
        fleet = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)
        assert {e.edge: e.pinned_variant for e in fleet.edges} == {"edge-1": "", "edge-2": small}
        assert fleet.policy.version == reply.policy.version
    finally:
        second.stop(0)


def test_an_idle_edge_stream_carries_empty_heartbeat_directives(tmp_path):
    store = _store(tmp_path / "store")
    running = server.start(
        server.CloudConfig(
            store=store.root, transport=Transport.plaintext(), db=tmp_path / "fleet.sqlite", heartbeat_s=0.2
        ),
        CollectorRegistry(),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        _register(stub)

        def requests():
            yield coordinator_pb2.EdgeReport(edge="edge-1", telemetry=coordinator_pb2.Telemetry(timestamp=1.0))
            time.sleep(2.0)  # then nothing: the stream is idle

        stream = stub.Connect(requests(), timeout=5)
        kinds = [next(stream).WhichOneof("body") for _ in range(3)]
        assert kinds == ["policy", "portfolio", "policy"]  # on connect, and once bound to the edge
        start = time.monotonic()
        beats = [next(stream) for _ in range(3)]
        assert all(b.WhichOneof("body") is None and b.ByteSize() == 0 for b in beats)  # nothing to apply
        assert 0.3 <= time.monotonic() - start <= 1.5  # one about every heartbeat_s, not more often
    finally:
        channel.close()
        running.stop(0)


def test_a_flooding_edge_is_read_at_its_pace_and_slows_no_other(tmp_path):
    """Edge-1 sends reports as fast as it can: the coordinator reads its burst, then about `rate` a
    second, losing none (the stream is slowed, not closed); edge-2's few reports go through at once."""
    store, registry = _store(tmp_path / "store"), CollectorRegistry()
    pace = PaceConfig(rate=20.0, burst=10)
    config = server.CloudConfig(store=store.root, transport=Transport.plaintext(), db=tmp_path / "f.sqlite", pace=pace)
    running = server.start(config, registry)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        _register(stub, "edge-1"), _register(stub, "edge-2")

        def reports(edge: str, count: int):
            for i in range(count):
                yield coordinator_pb2.EdgeReport(edge=edge, telemetry=coordinator_pb2.Telemetry(timestamp=1.0 + i))
            time.sleep(5.0)

        def stored() -> float:
            return registry.get_sample_value("prunefleet_cloud_reports_stored_total") or 0.0

        flood = stub.Connect(reports("edge-1", 60), timeout=10)
        next(flood)
        time.sleep(1.0)
        after_one_second = stored()
        assert 10 <= after_one_second <= 10 + 20 * 1.5  # the burst, then the rate
        assert registry.get_sample_value("prunefleet_cloud_reports_paced_total") >= 10
        other = stub.Connect(reports("edge-2", 3), timeout=10)
        next(other)
        time.sleep(0.5)
        assert stored() - after_one_second >= 3 + 5  # edge-2's three at once, edge-1 going on at its pace
        deadline = time.monotonic() + 5
        while stored() < 63 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stored() == 63  # nothing lost: every report of the flood was read in the end
        flood.cancel(), other.cancel()
    finally:
        channel.close()
        running.stop(0)
