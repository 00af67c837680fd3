"""Edge input is checked before it touches the database: 5 MB reports are refused naming the field
while the other streams carry on and `GetFleet` and `policy set` keep working; a newline or an escape
sequence in what an edge sends never reaches the cloud's log, or an operator's table, unescaped."""

import queue
import time

import grpc
import pytest
from helpers import variant_store, wait_for
from prometheus_client import CollectorRegistry

from cloud.admin import operator_client
from cloud.cli import main as cli
from cloud.localfleet import commands, processes
from cloud.service import server
from cloud.service.fleet_db import FleetDB
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc

PLAIN = Transport.plaintext()
HUGE = "x" * (5 << 20)  # under the 8 MiB message limit: it reaches the coordinator's checks
FORGED = "ok\nINFO FORGED\x1b[2J\x1b[31m"  # a second log line, and a terminal cleared and turned red


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return variant_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def cloud(store, tmp_path):
    registry = CollectorRegistry()
    running = server.start(
        server.CloudConfig(store=store.root, transport=PLAIN, db=tmp_path / "fleet.sqlite"), registry
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, coordinator_pb2_grpc.CoordinatorServiceStub(channel), registry
    channel.close()
    running.stop(0)


def _refusal(stub, report) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Connect(iter([report]), timeout=20))
    return err.value


def test_huge_reports_are_refused_naming_the_field_and_the_fleet_still_reads(cloud):
    running, stub, registry = cloud
    for edge in ("big", "steady"):
        stub.Register(coordinator_pb2.RegisterRequest(edge=edge, address="127.0.0.1:1", threads=1), timeout=10)
    steady: queue.Queue = queue.Queue()
    held = stub.Connect(iter(steady.get, None), timeout=60)  # another edge's stream, open throughout
    steady.put(coordinator_pb2.EdgeReport(edge="steady", telemetry=coordinator_pb2.Telemetry(timestamp=1.0)))
    assert next(held).HasField("policy")
    bad = {
        "profile.variant_id": coordinator_pb2.EdgeReport(
            edge="big", profile=coordinator_pb2.VariantProfile(variant_id=HUGE)
        ),
        "switch.reason": coordinator_pb2.EdgeReport(edge="big", switch=coordinator_pb2.SwitchEvent(reason=HUGE)),
        "telemetry.active_variant": coordinator_pb2.EdgeReport(
            edge="big", telemetry=coordinator_pb2.Telemetry(active_variant=HUGE)
        ),
    }
    for field, report in bad.items():
        refused = _refusal(stub, report)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and field in refused.details()
        assert len(refused.details()) < 1000  # the value is quoted cut, not echoed back
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(coordinator_pb2.RegisterRequest(edge="big", address=HUGE), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in err.value.details()
    steady.put(coordinator_pb2.EdgeReport(edge="steady", telemetry=coordinator_pb2.Telemetry(timestamp=2.0)))
    fleet = wait_for(
        lambda: (
            (f := operator_client.fleet(stub))
            and {e.edge: e.telemetry.timestamp for e in f.edges}["steady"] == 2.0
            and f
        ),
        what="the other stream's next window",
    )
    status = {e.edge: e for e in fleet.edges}
    assert status["steady"].connected and not status["big"].profiles and not status["big"].HasField("telemetry")
    policy = operator_client.set_policy(f"127.0.0.1:{running.port}", PLAIN, slo_ms=25.0)
    assert (policy.version, policy.slo_ms) == (2, 25.0)
    for kind, count in (("profile", 1), ("switch", 1), ("telemetry", 1), ("register", 1)):
        assert registry.get_sample_value("prunefleet_cloud_reports_refused_total", {"kind": kind}) == count
    steady.put(None)


def test_what_an_edge_sends_never_reaches_the_log_or_a_table_unescaped(store, tmp_path, capsys):
    db_path = tmp_path / "fleet.sqlite"
    child = processes.start("cloud", commands.cloud_args(store.root, db=db_path, certs=None), tmp_path / "logs")
    try:
        stub = operator_client.coordinator_stub(child.address, PLAIN)
        stub.Register(coordinator_pb2.RegisterRequest(edge="e1", address="127.0.0.1:1"), timeout=10)
        event = coordinator_pb2.SwitchEvent(timestamp=time.time(), reason=FORGED, reason_code="pinned")
        assert (
            _refusal(stub, coordinator_pb2.EdgeReport(edge="e1", switch=event)).code()
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        older = FleetDB(db_path, clock=time.time)  # what a coordinator from before the checks stored
        older.record_event("e1", event)
        older.close()
        assert cli.main(["fleet", "events", "--cloud", child.address, "--insecure"]) == 0
        assert cli.main(["fleet", "status", "--cloud", child.address, "--insecure"]) == 0
    finally:
        child.stop()
    out = capsys.readouterr().out
    assert "ok\\nINFO FORGED\\x1b[2J" in out and "\x1b" not in out
    assert not any(line.startswith("INFO FORGED") for line in out.splitlines())
    log = child.log_path.read_text()
    assert "refused switch from edge e1: switch.reason" in log and "ok\\nINFO FORGED" in log and "\x1b" not in log
    assert not any(line.startswith("INFO FORGED") for line in log.splitlines())
