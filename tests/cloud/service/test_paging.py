"""GetFleet and ListEvents in pages: a fleet of 10,000 edges with ten profiles each (more than one
message holds) read whole through `prunefleet fleet status`; events newest page first, none lost or
repeated while more arrive; page tokens checked; oversized rows from before the checks skipped."""

import hashlib

import grpc
import pytest
from helpers import variant_store
from prometheus_client import CollectorRegistry

from cloud.admin import operator_client
from cloud.cli import main as cli
from cloud.service import server
from cloud.service.fleet_db import FleetDB
from common.security import Transport
from common.wire import MAX_MESSAGE_BYTES
from protos import coordinator_pb2, coordinator_pb2_grpc

PLAIN = Transport.plaintext()
EDGES, PROFILES = 10_000, 10
VIDS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(PROFILES)]


def _seed(db: FleetDB) -> None:
    """10,000 registered edges, each with a telemetry window and ten profiles, through the fleet DB."""
    for i in range(EDGES):
        db.register(coordinator_pb2.RegisterRequest(edge=f"edge-{i:05d}", address=f"10.{i // 256}.{i % 256}.1:50061"))
    reports = []
    for i in range(EDGES):
        edge = f"edge-{i:05d}"
        telemetry = coordinator_pb2.Telemetry(timestamp=1.7e9, active_variant=VIDS[i % PROFILES], p95_ms=3.0)
        reports.append(coordinator_pb2.EdgeReport(edge=edge, telemetry=telemetry))
        for vid in VIDS:
            profile = coordinator_pb2.VariantProfile(variant_id=vid, p50_ms_b1=1.0, p95_ms_b1=2.0, batch=8)
            reports.append(coordinator_pb2.EdgeReport(edge=edge, profile=profile))
    db.record_reports(reports)


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("paging")
    store = variant_store(work / "store")
    seeding = FleetDB(work / "fleet.sqlite", clock=lambda: 1.7e9)
    _seed(seeding)
    seeding.close()
    running = server.start(
        server.CloudConfig(store=store.root, transport=PLAIN, db=work / "fleet.sqlite"), CollectorRegistry()
    )
    yield running
    running.stop(0)


def test_fleet_status_reads_ten_thousand_edges_page_after_page(big_fleet, capsys):
    stub = operator_client.coordinator_stub(f"127.0.0.1:{big_fleet.port}", PLAIN)
    pages, token = [], ""
    while token or not pages:
        pages.append(stub.GetFleet(coordinator_pb2.GetFleetRequest(page_token=token), timeout=60))
        token = pages[-1].next_page_token
    assert len(pages) >= EDGES // 1000 and all(page.ByteSize() < MAX_MESSAGE_BYTES for page in pages)
    assert sum(page.ByteSize() for page in pages) > MAX_MESSAGE_BYTES  # one reply could not have held them
    edges = [edge for page in pages for edge in page.edges]
    assert [e.edge for e in edges] == [f"edge-{i:05d}" for i in range(EDGES)]  # each once, in name order
    assert all(len(e.profiles) == PROFILES for e in edges)
    assert cli.main(["fleet", "status", "--cloud", f"127.0.0.1:{big_fleet.port}", "--insecure"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("edge-")]
    assert len(rows) == EDGES and rows[-1].split()[0] == f"edge-{EDGES - 1:05d}"
    assert operator_client.set_policy(f"127.0.0.1:{big_fleet.port}", PLAIN, slo_ms=30.0).slo_ms == 30.0


@pytest.fixture
def cloud(tmp_path):
    store = variant_store(tmp_path / "store", widths=(0.125,))
    running = server.start(
        server.CloudConfig(store=store.root, transport=PLAIN, db=tmp_path / "fleet.sqlite"), CollectorRegistry()
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, coordinator_pb2_grpc.CoordinatorServiceStub(channel), tmp_path / "fleet.sqlite"
    channel.close()
    running.stop(0)


def test_events_page_from_the_newest_back_and_new_ones_shift_nothing(cloud):
    _, stub, path = cloud
    db = FleetDB(path, clock=lambda: 1.7e9)
    for t in range(2500):
        db.record_event(f"e{t % 3}", coordinator_pb2.SwitchEvent(timestamp=1000.0 + t // 2, reason=f"n{t}"))
    first = stub.ListEvents(coordinator_pb2.ListEventsRequest(page_size=1000), timeout=30)
    db.record_event("e0", coordinator_pb2.SwitchEvent(timestamp=5000.0, reason="arrived while paging"))
    pages = [first]
    while pages[-1].next_page_token:
        request = coordinator_pb2.ListEventsRequest(page_size=1000, page_token=pages[-1].next_page_token)
        pages.append(stub.ListEvents(request, timeout=30))
    assert [len(p.events) for p in pages] == [1000, 1000, 500]
    reasons = [e.event.reason for page in reversed(pages) for e in page.events]  # oldest page first
    assert reasons == [f"n{t}" for t in range(2500)]  # each once, in time order, the late one not among them
    newest = operator_client.events(stub, limit=3)
    assert [e.event.reason for e in newest] == ["n2498", "n2499", "arrived while paging"]
    assert len(operator_client.events(stub, edge="e1")) == 833  # every event of one edge, across pages
    db.close()


BAD_PAGES = [
    ("GetFleet", coordinator_pb2.GetFleetRequest(page_token="not-a-token"), "page_token"),
    ("GetFleet", coordinator_pb2.GetFleetRequest(page_size=-1), "page_size"),
    ("ListEvents", coordinator_pb2.ListEventsRequest(page_token="A" * 5000), "page_token"),
    ("ListEvents", coordinator_pb2.ListEventsRequest(page_size=-3), "page_size"),
]


@pytest.mark.parametrize("rpc, request_, named", BAD_PAGES, ids=[f"{r}-{n}" for r, _, n in BAD_PAGES])
def test_bad_page_requests_are_refused_naming_the_field(cloud, rpc, request_, named):
    with pytest.raises(grpc.RpcError) as err:
        getattr(cloud[1], rpc)(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details()


def test_a_token_is_good_only_for_the_query_it_came_with(cloud):
    _, stub, path = cloud
    db = FleetDB(path, clock=lambda: 1.7e9)
    for i in range(3):
        db.register(coordinator_pb2.RegisterRequest(edge=f"e{i}"))
        db.record_event(f"e{i}", coordinator_pb2.SwitchEvent(timestamp=10.0 + i))
    fleet_token = stub.GetFleet(coordinator_pb2.GetFleetRequest(page_size=1), timeout=10).next_page_token
    events_token = stub.ListEvents(coordinator_pb2.ListEventsRequest(page_size=1), timeout=10).next_page_token
    assert fleet_token and events_token
    refused = [
        lambda: stub.GetFleet(coordinator_pb2.GetFleetRequest(page_token=events_token), timeout=10),
        lambda: stub.ListEvents(coordinator_pb2.ListEventsRequest(page_token=fleet_token), timeout=10),
        lambda: stub.ListEvents(coordinator_pb2.ListEventsRequest(edge="e1", page_token=events_token), timeout=10),
    ]
    for call in refused:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in err.value.details()
    second = stub.GetFleet(coordinator_pb2.GetFleetRequest(page_size=1, page_token=fleet_token), timeout=10)
    assert [e.edge for e in second.edges] == ["e1"] and second.next_page_token
    huge = stub.GetFleet(coordinator_pb2.GetFleetRequest(page_size=1 << 30), timeout=10)  # held to the maximum
    assert [e.edge for e in huge.edges] == ["e0", "e1", "e2"] and not huge.next_page_token
    db.close()


def test_rows_an_older_coordinator_stored_unchecked_are_skipped_not_fatal(cloud):
    _, stub, path = cloud
    db = FleetDB(path, clock=lambda: 1.7e9)
    db.register(coordinator_pb2.RegisterRequest(edge="loud"))
    for n in range(2):  # two 5 MB profiles: together past the message limit
        db.record_profile("loud", coordinator_pb2.VariantProfile(variant_id=f"{n}" + "v" * (5 << 20)))
    db.record_profile("loud", coordinator_pb2.VariantProfile(variant_id=VIDS[0]))
    db.record_event("loud", coordinator_pb2.SwitchEvent(timestamp=1.0, reason="r" * (5 << 20)))
    db.record_event("loud", coordinator_pb2.SwitchEvent(timestamp=2.0, reason="fine"))
    (edge,) = operator_client.fleet(stub).edges
    assert [p.variant_id for p in edge.profiles] == [VIDS[0]]
    assert [e.event.reason for e in operator_client.events(stub)] == ["fine"]
    db.close()
