"""Rollouts on a real fleet database and catalog: selection, the canary verdict, promotion and rollback."""

import pytest
from helpers import variant_store as _store

from cloud.build.store import Manifest, PortfolioStore, portfolio_id
from cloud.service.catalog import Catalog
from cloud.service.fleet_db import FleetDB
from cloud.service.rollout import (
    DEFAULTS,
    RolloutConflict,
    RolloutError,
    Rollouts,
    judge,
    select,
    thresholds,
)
from protos import coordinator_pb2

LIMITS = thresholds(coordinator_pb2.RolloutThresholds(min_windows=2, adopt_timeout_s=30))


def test_selectors_match_names_and_patterns():
    names = ["edge-1", "edge-2", "lab-1"]
    assert select(names, "") == names and select(names, "*") == names
    assert select(names, "edge-*") == ["edge-1", "edge-2"]
    assert select(names, "lab-1, edge-2") == ["edge-2", "lab-1"]
    assert select(names, "nothing") == []


def test_thresholds_fill_defaults_and_refuse_nonsense():
    assert thresholds(coordinator_pb2.RolloutThresholds()) == DEFAULTS
    for bad in (dict(min_slo_attainment=1.5), dict(max_error_rate=-0.1), dict(min_windows=-1)):
        with pytest.raises(RolloutError):
            thresholds(coordinator_pb2.RolloutThresholds(**bad))


@pytest.mark.parametrize(
    "windows, outcome",
    [
        ([("a", 5.0, 10, 0)], "wait"),  # too few windows to judge
        (
            [("a", 5.0, 10, 0), ("a", 5.0, 0, 0), ("a", 5.0, 10, 0)],
            "wait",
        ),  # b has none yet; empty windows count for nothing
        ([("a", 5.0, 10, 0), ("a", 5.0, 10, 0), ("b", 5.0, 10, 0), ("b", 6.0, 10, 0)], "pass"),
        ([("a", 5.0, 10, 5), ("a", 5.0, 10, 5)], "fail"),  # error rate 50%
        ([("a", 50.0, 10, 0), ("b", 50.0, 10, 0)], "fail"),  # SLO attainment 0%
    ],
)
def test_the_canary_verdict(windows, outcome):
    assert judge(windows, ["a", "b"], 10.0, LIMITS).outcome == outcome


class Pushed(list):
    """Every push: (edge, portfolio id); `versions` the listing version of each."""

    def __init__(self):
        super().__init__()
        self.versions = []

    def __call__(self, edge, listing):
        self.append((edge, listing.portfolio_id))
        self.versions.append(listing.version)


@pytest.fixture
def fleet(tmp_path):
    first = _store(tmp_path / "first")
    manifest = first.manifest()
    second = PortfolioStore(tmp_path / "second")  # the same files, one variant fewer: another portfolio
    entry = manifest.variants[0]
    second.put_variant(first.variant_path(entry.variant_id).read_bytes())
    second.write_manifest(
        Manifest(portfolio_id([entry.variant_id]), "vgg11", "fashion-mnist", "shifter", 0.0, {}, (entry,))
    )
    now = [1000.0]
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: now[0])
    db.save_policy(coordinator_pb2.Policy(slo_ms=10.0, version=1))
    catalog = Catalog(db)
    catalog.start_with(first.root)
    for name in ("edge-1", "edge-2", "edge-3"):
        db.register(coordinator_pb2.RegisterRequest(edge=name))
    pushed = Pushed()
    rollouts = Rollouts(db, catalog, db.policy, pushed, lambda: now[0])
    yield db, catalog, rollouts, pushed, now, manifest.portfolio_id, catalog.add(second.root).portfolio_id
    db.close()


def _report(db, edge, portfolio_id, at, p95=5.0, requests=10, errors=0):
    db.record_telemetry(
        edge,
        coordinator_pb2.Telemetry(
            timestamp=at, portfolio_id=portfolio_id, p95_ms=p95, requests=requests, errors=errors
        ),
    )


def test_a_healthy_canary_is_promoted_to_every_selected_edge(fleet):
    db, catalog, rollouts, pushed, now, first, second = fleet
    rollout = rollouts.deploy(
        coordinator_pb2.DeployRequest(portfolio=second, edges="edge-*", canary=1, thresholds=LIMITS)
    )
    new = rollout.portfolio_id
    assert (rollout.state, list(rollout.canary_edges), list(rollout.edges)) == (
        "canary",
        ["edge-1"],
        ["edge-1", "edge-2", "edge-3"],
    )
    # the canary gets the new portfolio, every other edge its own again, all under one new listing version
    assert pushed == [("edge-1", new), ("edge-2", first), ("edge-3", first)]
    assert pushed.versions == [1001] * 3 and catalog.version == 1001  # the first: 1000, the clock's second
    assert db.desired("edge-1") == new and db.desired("edge-2") in ("", first)
    with pytest.raises(RolloutConflict):
        rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=first))
    assert rollouts.tick() is None  # the canary does not hold it yet
    for t in (1001.0, 1002.0):
        _report(db, "edge-1", new, t)
    now[0] = 1003.0
    assert rollouts.tick().state == "complete"
    assert [db.desired(e) for e in ("edge-1", "edge-2", "edge-3")] == [new] * 3
    assert pushed[3:] == [("edge-2", new), ("edge-3", new), ("edge-1", new)] and pushed.versions[3:] == [1003] * 3
    assert catalog.current() == first  # chosen by a selector: edges that register later get the fleet's


def test_an_unhealthy_canary_rolls_back_on_its_own(fleet):
    db, catalog, rollouts, pushed, now, first, second = fleet
    rollout = rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=second, canary=2, thresholds=LIMITS))
    for edge in rollout.canary_edges:
        _report(db, edge, first, 1001.0, errors=10)  # windows on another portfolio are not the canary's
        _report(db, edge, rollout.portfolio_id, 1002.0, errors=4)
    done = rollouts.tick()
    assert done.state == "rolled_back" and "error rate 40.0%" in done.reason
    assert [db.desired(e) for e in ("edge-1", "edge-2")] == [first, first]
    assert pushed[3:] == [("edge-1", first), ("edge-2", first), ("edge-3", first)]
    assert pushed.versions[3:] == [1002] * 3  # the rollback is a new version, above the deploy's
    assert catalog.current() == first
    with pytest.raises(RolloutConflict):
        rollouts.rollback(done.id)


def test_canaries_that_never_hold_it_roll_back_after_the_timeout_and_by_hand_too(fleet):
    db, catalog, rollouts, pushed, now, first, second = fleet
    rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=second, thresholds=LIMITS))
    now[0] = 1031.0
    done = rollouts.tick()
    assert done.state == "rolled_back" and "did not hold" in done.reason
    again = rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=done.portfolio_id, thresholds=LIMITS))
    assert rollouts.rollback(0, "by hand").reason == "by hand" and rollouts.get(again.id).state == "rolled_back"
    with pytest.raises(RolloutError, match="not a portfolio id known"):
        rollouts.deploy(coordinator_pb2.DeployRequest(portfolio="/no/such/store"))
    with pytest.raises(RolloutError, match="matches no"):
        rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=first, edges="ghost-*"))
