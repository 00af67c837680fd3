"""Coordinator state: a switch event sent twice (an edge resends after a broken stream) is stored once."""

from cloud.service.fleet_db import FleetDB
from protos import coordinator_pb2


def test_a_resent_switch_event_is_stored_once(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0)
    event = coordinator_pb2.SwitchEvent(timestamp=5.0, from_variant="a", to_variant="b", reason_code="pinned")
    db.record_event("e1", event)
    db.record_event("e1", event)
    db.record_event("e2", event)  # another edge's identical event is its own
    db.record_event("e1", coordinator_pb2.SwitchEvent(timestamp=6.0, from_variant="b", to_variant="a"))
    assert [(e.edge, e.event.timestamp) for e in db.events()] == [("e1", 5.0), ("e2", 5.0), ("e1", 6.0)]


def test_state_is_on_disk_when_the_database_is_opened_again(tmp_path):
    """What a coordinator restart relies on: policy history, desired and reported state, windows stored once."""
    from cloud.admin.operator_client import edge_state

    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0)
    db.register(coordinator_pb2.RegisterRequest(edge="e1", address="a:1"))
    for version in (1, 2):
        db.save_policy(coordinator_pb2.Policy(slo_ms=10.0 * version, version=version))
    db.set_desired(["e1"], "p-new")
    window = coordinator_pb2.Telemetry(timestamp=90.0, portfolio_id="p-old", policy_version=2, requests=5)
    db.record_telemetry("e1", window)
    db.record_telemetry("e1", window)  # resent after a broken stream
    db.record_telemetry("e1", coordinator_pb2.Telemetry(timestamp=80.0, portfolio_id="p-older"))  # late, buffered
    db.close()
    again = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 200.0)
    assert [p.slo_ms for p in again.policies()] == [10.0, 20.0] and again.policy().version == 2
    (edge,) = again.edges()
    assert (edge.desired_portfolio_id, edge.reported_portfolio_id, edge.policy_version) == ("p-new", "p-old", 2)
    assert again.windows(["e1"], "p-old", 0.0) == [("e1", 0.0, 5, 0)]
    assert edge_state(edge, now=200.0) == "stale"  # not heard from for 100 s: stale, still listed
