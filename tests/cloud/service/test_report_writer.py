"""The coordinator's report writer and the aio server: reports batched into few transactions and never
lost, thousands of streams without a thread each, and the bound past which an RPC is refused."""

import threading
import time

import grpc
import pytest
from helpers import variant_store, wait_for
from prometheus_client import CollectorRegistry

from cloud.admin import operator_client
from cloud.service import server
from cloud.service.fleet_db import FleetDB
from cloud.service.report_writer import ReportWriter, WriterConfig
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc

PORTFOLIO = "0123456789abcdef"  # a portfolio id of the form edges report


def _window(edge: str, t: float) -> coordinator_pb2.EdgeReport:
    return coordinator_pb2.EdgeReport(
        edge=edge, telemetry=coordinator_pb2.Telemetry(timestamp=t, portfolio_id=PORTFOLIO, requests=3, p95_ms=4.0)
    )


def _windows(db: FleetDB) -> set:
    return set(db.query("SELECT edge, timestamp FROM windows"))


def test_reports_from_many_threads_are_all_stored_in_few_transactions(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    for i in range(50):
        db.register(coordinator_pb2.RegisterRequest(edge=f"e{i}"))
    writer = ReportWriter(db, WriterConfig(tick_s=0.05))
    sent = {(f"e{i}", 1000.0 + k) for i in range(50) for k in range(40)}

    def edge(i: int) -> None:
        for k in range(40):
            writer.put(_window(f"e{i}", 1000.0 + k))

    threads = [threading.Thread(target=edge, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.put(_window("e0", 1000.0))  # a window sent again is stored once
    assert writer.flush()
    assert _windows(db) == sent and writer.written == len(sent) + 1 and writer.dropped == 0
    assert writer.batches < len(sent) / 10  # batched, not one commit per report
    (edge_0,) = [e for e in db.edges() if e.edge == "e0"]
    assert edge_0.telemetry.timestamp == 1039.0  # the newest window is the reported state
    writer.close()
    db.close()


def test_a_batch_that_fails_to_commit_is_retried_then_counted_as_dropped(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    real, failures = db.record_reports, {"left": 2}

    def flaky(reports):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("database is locked")
        real(reports)

    db.record_reports = flaky
    writer = ReportWriter(db, WriterConfig(tick_s=0.05, attempts=3))
    writer.put(_window("e1", 1.0))
    assert writer.flush() and _windows(db) == {("e1", 1.0)} and writer.dropped == 0
    failures["left"] = 10
    writer.put(_window("e1", 2.0))
    assert writer.flush() and writer.dropped == 1 and writer.written == 1
    writer.close()
    db.close()


def test_record_reports_stores_what_the_single_writes_store(tmp_path):
    now = lambda: 50.0  # noqa: E731
    one, many = FleetDB(tmp_path / "one.sqlite", now), FleetDB(tmp_path / "many.sqlite", now)
    reports = [
        _window("e1", 10.0),
        coordinator_pb2.EdgeReport(edge="e1", switch=coordinator_pb2.SwitchEvent(timestamp=11.0, to_variant="v")),
        coordinator_pb2.EdgeReport(edge="e1", profile=coordinator_pb2.VariantProfile(variant_id="v", p50_ms_b1=1.0)),
        _window("e1", 9.0),
    ]
    for db in (one, many):
        db.register(coordinator_pb2.RegisterRequest(edge="e1"))
    one.record_telemetry("e1", reports[0].telemetry)
    one.record_event("e1", reports[1].switch)
    one.record_profile("e1", reports[2].profile)
    one.record_telemetry("e1", reports[3].telemetry)
    many.record_reports(reports)
    assert one.edges() == many.edges() and one.events() == many.events() and _windows(one) == _windows(many)


@pytest.fixture()
def small_cloud(tmp_path):
    """A cloud with a thread pool of 4 and room for 40 RPCs at once."""
    store = variant_store(tmp_path / "store")
    running = server.start(
        server.CloudConfig(
            store=store.root, transport=Transport.plaintext(), workers=4, max_rpcs=40, db=tmp_path / "fleet.sqlite"
        ),
        CollectorRegistry(),
    )
    yield running
    running.stop(0)


def _open_stream(stub, name: str, stop: threading.Event):
    stub.Register(coordinator_pb2.RegisterRequest(edge=name, address="127.0.0.1:1"), timeout=10)

    def reports():
        yield _window(name, time.time())
        stop.wait(30)

    return stub.Connect(reports(), timeout=30)


def test_streams_are_not_bounded_by_the_thread_pool_and_past_max_rpcs_are_refused(small_cloud):
    channel = grpc.insecure_channel(f"127.0.0.1:{small_cloud.port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    stop = threading.Event()
    calls = [_open_stream(stub, f"edge-{i}", stop) for i in range(30)]  # far more than the 4 threads
    try:
        assert all(next(call).HasField("policy") for call in calls)
        fleet = wait_for(
            lambda: (f := operator_client.fleet(stub)) and sum(e.connected for e in f.edges) == 30 and f,
            20,
            "every stream bound",
        )
        assert all(e.telemetry.timestamp > 0 for e in fleet.edges)  # each one's window is stored
        codes = []
        for i in range(15):  # 45 > max_rpcs = 40: Register or Connect is refused, the edge retries later
            try:
                calls.append(_open_stream(stub, f"extra-{i}", stop))  # held open, as an edge holds it
                next(calls[-1])
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        assert "RESOURCE_EXHAUSTED" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    finally:
        stop.set()
        channel.close()
