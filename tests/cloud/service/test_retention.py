"""Retention by the coordinator's clock (injected here): old and surplus events go, departed edges go
with their profiles, windows and pins unless connected or in a canary rollout, profiles are kept to
the newest N per edge on write; the background pass runs on its own; the serve flags set it all."""

import time

import pytest
from helpers import wait_for

from cloud.service import serve_command
from cloud.service.fleet_db import FleetDB
from cloud.service.retention import DAY_S, Pruned, Retention, RetentionConfig, prune
from protos import coordinator_pb2

VIDS = [f"{i:064x}" for i in range(6)]


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _event(db, edge: str, t: float) -> None:
    db.record_event(edge, coordinator_pb2.SwitchEvent(timestamp=t, reason=f"at {t}"))


def _count(db, table: str) -> int:
    return db.query(f"SELECT COUNT(*) FROM {table}")[0][0]


def test_events_go_by_when_the_coordinator_stored_them_and_beyond_the_count(tmp_path):
    clock = Clock(100 * DAY_S)
    db = FleetDB(tmp_path / "fleet.sqlite", clock=clock)
    _event(db, "e1", 1.0)  # the edge's clock says 1970, but the coordinator stored it now
    clock.now += 5 * DAY_S
    _event(db, "e1", 2.0)
    config = RetentionConfig(event_retention_days=7, max_events=1000)
    assert prune(db, config, clock.now).events == 0  # both within a week of being stored
    clock.now += 3 * DAY_S
    assert prune(db, config, clock.now) == Pruned(events=1)
    assert [e.event.timestamp for e in db.events()] == [2.0]
    for t in range(1200):
        _event(db, "e2", 10.0 + t)
    assert prune(db, config, clock.now).events == 201  # the oldest beyond the newest 1000
    assert _count(db, "events") == 1000 and db.events(limit=1)[0].event.timestamp == 1209.0
    db.close()


def _edge(db, name: str, clock: Clock) -> None:
    db.register(coordinator_pb2.RegisterRequest(edge=name))
    db.record_telemetry(name, coordinator_pb2.Telemetry(timestamp=clock.now, requests=1))
    db.record_profile(name, coordinator_pb2.VariantProfile(variant_id=VIDS[0]))


def test_departed_edges_go_with_their_state_unless_connected_or_in_a_canary_rollout(tmp_path):
    clock = Clock(1000 * DAY_S)
    db = FleetDB(tmp_path / "fleet.sqlite", clock=clock)
    for name in ("gone", "canary", "connected", "recent"):
        _edge(db, name, clock)
    db.save_policy(coordinator_pb2.Policy(slo_ms=10, version=1))
    db.pin(["gone"], VIDS[0])
    db.transaction(
        [
            ("INSERT INTO rollouts (id, state, rollout) VALUES (1, 'canary', x'')", ()),
            ("INSERT INTO rollout_edges (rollout_id, edge, previous, canary) VALUES (1, 'canary', 'p', 1)", ()),
        ]
    )
    clock.now += 20 * DAY_S
    db.touch("recent")
    config = RetentionConfig(edge_retention_days=14)
    assert prune(db, config, clock.now, connected={"connected"}).edges == 1
    assert db.edge_names() == ["canary", "connected", "recent"]
    for table in ("profiles", "windows", "pins"):
        assert not db.query(f"SELECT 1 FROM {table} WHERE edge = 'gone'")
    db.execute("UPDATE rollouts SET state = 'complete'", ())
    assert prune(db, config, clock.now, connected=set()).edges == 2  # the rollout over, nobody connected
    assert db.edge_names() == ["recent"]
    db.close()


def test_profiles_are_kept_to_the_newest_per_edge_on_write_and_by_the_pass(tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time, keep_profiles=3)
    for vid in VIDS:
        db.record_profile("e1", coordinator_pb2.VariantProfile(variant_id=vid))
    db.record_reports(
        [coordinator_pb2.EdgeReport(edge="e2", profile=coordinator_pb2.VariantProfile(variant_id=v)) for v in VIDS]
    )
    db.record_profile("e1", coordinator_pb2.VariantProfile(variant_id=VIDS[0], p50_ms_b1=9.0))  # newer again
    held = {e: {v for (v,) in db.query("SELECT variant_id FROM profiles WHERE edge = ?", (e,))} for e in ("e1", "e2")}
    assert held == {"e1": {VIDS[0], VIDS[4], VIDS[5]}, "e2": set(VIDS[3:])}
    db.close()
    wider = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    assert prune(wider, RetentionConfig(keep_profiles=2), time.time()).profiles == 2  # a lower bound, by the pass
    assert _count(wider, "profiles") == 4
    wider.close()


def test_the_background_pass_prunes_on_its_own(tmp_path):
    clock = Clock(100 * DAY_S)
    db = FleetDB(tmp_path / "fleet.sqlite", clock=clock)
    _event(db, "e1", 1.0)
    clock.now += 2 * DAY_S
    running = Retention(db, RetentionConfig(event_retention_days=1, prune_every_s=0.05), connected=set).start()
    try:
        wait_for(lambda: _count(db, "events") == 0, 10, "the old event pruned")
    finally:
        running.stop()
    db.close()


def test_the_serve_flags_set_the_retention_and_bad_values_name_the_setting(tmp_path):
    import argparse

    from cloud.service import server

    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser, environ={})
    args = parser.parse_args(["--store", str(tmp_path), "--insecure", "--keep-profiles", "4", "--max-events", "5000"])
    config = serve_command.config(args)
    assert config.retention == RetentionConfig(keep_profiles=4, max_events=5000)
    assert config.max_rpcs == server.MAX_RPCS
    with pytest.raises(ValueError, match="event_retention_days"):
        serve_command.config(parser.parse_args(["--store", ".", "--insecure", "--event-retention-days", "0"]))
