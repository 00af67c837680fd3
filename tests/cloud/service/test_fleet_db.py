"""Coordinator state: a switch event sent twice (an edge resends after a broken stream) is stored once;
state survives a reopen; policy versions are numbered by the database, once each."""

import threading

import pytest

from cloud.service.fleet_db import FleetDB, NoPolicy
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


def test_set_policy_numbers_each_policy_after_the_latest_and_keeps_the_history(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0)
    db.save_policy(coordinator_pb2.Policy(slo_ms=10.0, version=1))
    second = db.set_policy(coordinator_pb2.Policy(slo_ms=20.0, version=99))  # the caller's version is ignored
    third = db.set_policy(coordinator_pb2.Policy(slo_ms=30.0))
    assert (second.version, third.version) == (2, 3) and db.policy() == third
    assert [(p.version, p.slo_ms) for p in db.policies()] == [(1, 10.0), (2, 20.0), (3, 30.0)]


def test_a_pin_lands_with_a_new_version_of_the_same_policy_or_not_at_all(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0)
    with pytest.raises(NoPolicy):
        db.pin(["e1"], "v-small")  # nothing to number yet
    assert db.pins() == {} and db.policies() == []  # the pin was rolled back with it
    db.save_policy(coordinator_pb2.Policy(slo_ms=10.0, version=1))
    pinned = db.pin(["e1", "e2"], "v-small")
    unpinned = db.pin(["e1"], "")
    assert db.pins() == {"e2": "v-small"}
    assert [(p.version, p.slo_ms) for p in db.policies()] == [(1, 10.0), (2, 10.0), (3, 10.0)]
    assert (pinned.version, unpinned.version) == (2, 3) and db.policy() == unpinned


def test_versions_stay_distinct_across_threads_and_connections(tmp_path):
    """Two connections to one file (as two processes would hold) and threads on each: every call gets
    its own version, with no gap, and the history row of each is the policy that call stored."""
    dbs = [FleetDB(tmp_path / "fleet.sqlite", clock=lambda: 100.0) for _ in range(2)]
    dbs[0].save_policy(coordinator_pb2.Policy(slo_ms=1.0, version=1))
    stored: list[coordinator_pb2.Policy] = []

    def work(db: FleetDB, thread: int) -> None:
        for i in range(25):
            stored.append(db.set_policy(coordinator_pb2.Policy(slo_ms=2.0 + thread * 100 + i)))

    workers = [threading.Thread(target=work, args=(dbs[t % 2], t)) for t in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(p.version for p in stored) == list(range(2, 2 + 8 * 25))
    history = {p.version: p for p in dbs[1].policies()}
    assert len(history) == 1 + 8 * 25 and all(history[p.version] == p for p in stored)
