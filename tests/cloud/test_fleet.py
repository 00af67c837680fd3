"""Coordinator state: a switch event sent twice (an edge resends after a broken stream) is stored once."""

from cloud.fleet import FleetDB
from protos import coordinator_pb2


def test_a_resent_switch_event_is_stored_once(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0)
    event = coordinator_pb2.SwitchEvent(timestamp=5.0, from_variant="a", to_variant="b", reason_code="pinned")
    db.record_event("e1", event)
    db.record_event("e1", event)
    db.record_event("e2", event)  # another edge's identical event is its own
    db.record_event("e1", coordinator_pb2.SwitchEvent(timestamp=6.0, from_variant="b", to_variant="a"))
    assert [(e.edge, e.event.timestamp) for e in db.events()] == [("e1", 5.0), ("e2", 5.0), ("e1", 6.0)]
