"""The cloud's signed listings: a version that rises with every deploy, promotion, rollback and refresh
and rises again at every start of the cloud, an expiry issued afresh before it passes, and an edge's
guard that takes an operator's rollback and refuses the deploy's listing replayed after it."""

import argparse

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import variant_store

from cloud.service import serve_command
from cloud.service.catalog import VALIDITY_S, Catalog
from cloud.service.deploys import DeployConfig
from cloud.service.fleet_db import FleetDB
from cloud.service.rollout import Rollouts
from common import listing as listings
from common.security import Signer, Verifier
from edge.listing_guard import ListingGuard
from protos import coordinator_pb2

KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return variant_store(root / "first", widths=(0.125,)).root, variant_store(root / "second", widths=(0.0625,)).root


def _cloud(tmp_path, stores, now):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: now[0])
    db.save_policy(coordinator_pb2.Policy(slo_ms=10.0, version=1))
    catalog = Catalog(db, Signer(KEY))
    catalog.start_with(stores[0])
    catalog.set_validity(VALIDITY_S)
    return db, catalog


def test_versions_rise_persist_and_rise_again_at_a_restart(tmp_path, stores):
    now = [1_800_000_000.0]
    db, catalog = _cloud(tmp_path, stores, now)
    first = catalog.listing()  # the first version: the unix second it was issued
    assert first.version == int(now[0]) and first.expires_at_unix == int(now[0] + VALIDITY_S)
    assert listings.problem(first, Verifier(KEY.public_key()), now[0], listings.Accepted()) is None
    assert catalog.issue() == first.version + 1 and (before := catalog.listing()).version == first.version + 1
    db.close()
    db, again = _cloud(tmp_path, stores, now)  # a restarted cloud issues a new version
    assert again.listing().version == before.version + 1
    db.close()
    rekeyed = Signer(Ed25519PrivateKey.generate())  # a cloud restarted with another key: a new version again
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: now[0])
    assert Catalog(db, rekeyed).listing().version == before.version + 2
    db.close()
    for lost_file in tmp_path.glob("fleet.sqlite*"):  # the fleet database lost: versions still rise, by the clock
        lost_file.unlink()
    now[0] += 10
    db, lost = _cloud(tmp_path, stores, now)
    assert lost.version == int(now[0]) > before.version
    db.close()


def test_a_cloud_started_with_a_shorter_validity_issues_one_version_valid_for_it(tmp_path, stores):
    now = [1_800_000_000.0]
    db, catalog = _cloud(tmp_path, stores, now)
    before = catalog.listing()
    db.close()
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: now[0])
    shorter = Catalog(db, Signer(KEY), validity_s=3600.0)
    shorter.start_with(stores[0])
    shorter.set_validity(3600.0)  # as the coordinator does: nothing left to issue
    again = shorter.listing()
    assert again.version == before.version + 1 and again.expires_at_unix == int(now[0] + 3600.0)
    db.close()
    with pytest.raises(ValueError, match="listing validity"):
        Catalog(FleetDB(tmp_path / "other.sqlite", clock=lambda: now[0]), validity_s=1.0)


def test_listings_are_issued_again_before_they_expire_and_at_once_after_a_late_restart(tmp_path, stores):
    now = [1_800_000_000.0]
    db, catalog = _cloud(tmp_path, stores, now)
    for name in ("edge-1", "edge-2"):
        db.register(coordinator_pb2.RegisterRequest(edge=name))
    pushed = []
    rollouts = Rollouts(
        db, catalog, db.policy, lambda e, p: pushed.append((e, p.version)), lambda: now[0], lambda: {"edge-1"}
    )
    issued = catalog.version
    now[0] += VALIDITY_S / 2 - 1
    assert not catalog.due() and rollouts.tick() is None and pushed == []
    now[0] += 1
    assert catalog.due() and rollouts.tick() is None
    assert pushed == [("edge-1", int(now[0]))] and catalog.listing().expires_at_unix == int(now[0] + VALIDITY_S)
    now[0] += 2 * VALIDITY_S  # the cloud was down past every expiry
    catalog.set_validity(VALIDITY_S)
    assert catalog.version == int(now[0]) > issued and not catalog.due()
    catalog.set_validity(3600.0)  # shorter than the listings were issued with: issued again under it
    assert catalog.listing().expires_at_unix == int(now[0] + 3600) and catalog.version == int(now[0]) + 1
    for bad in (1.0, 400 * 86400.0):
        with pytest.raises(ValueError, match="validity"):
            catalog.set_validity(bad)
        with pytest.raises(ValueError, match="validity"):
            DeployConfig(listing_validity_s=bad)
    db.close()


def test_an_operator_rollback_is_taken_and_the_deploy_replayed_after_it_refused(tmp_path, stores):
    now = [1_800_000_000.0]
    db, catalog = _cloud(tmp_path, stores, now)
    db.register(coordinator_pb2.RegisterRequest(edge="edge-1"))
    guard = ListingGuard(Verifier(KEY.public_key()), tmp_path / "cache", wall_clock=lambda: now[0])
    pushed = []
    rollouts = Rollouts(db, catalog, db.policy, lambda e, p: pushed.append(p), lambda: now[0])
    assert guard.admit(catalog.listing())
    second = catalog.add(stores[1]).portfolio_id
    rollout = rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=second))
    deployed = pushed[-1]
    assert deployed.portfolio_id == second and guard.admit(deployed)
    rollouts.rollback(rollout.id, "by hand")
    restored = pushed[-1]
    assert restored.portfolio_id == catalog.current() != second and restored.version > deployed.version
    assert guard.admit(restored) and not guard.admit(deployed)
    db.close()


def test_the_listing_validity_flag_reaches_the_deploy_settings_and_a_bad_one_names_it():
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser, environ={})
    base = ["--store", ".", "--insecure"]
    assert serve_command.config(parser.parse_args(base)).deploys.listing_validity_s == VALIDITY_S
    assert (
        serve_command.config(parser.parse_args([*base, "--listing-validity", "12h"])).deploys.listing_validity_s
        == 43200
    )
    for bad in ("1s", "500d", "soon"):
        with pytest.raises(ValueError, match="listing validity"):
            serve_command.config(parser.parse_args([*base, "--listing-validity", bad]))
