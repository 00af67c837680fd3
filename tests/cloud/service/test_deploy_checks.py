"""What the cloud checks before it serves a store it did not build, on real stores, a real fleet
database and real gRPC on loopback: paths stay under the portfolio root, nothing in a store is a
symlink, sizes are bounded, the manifest is an object whose id its members make, a catalogued store
is hashed again on start, canaries cannot be taken by a new name, rollout and policy commits are
synchronous before any directive goes out, and hashing a deploy never holds up a rollback."""

import argparse
import dataclasses
import json
import os
import threading
import time
from concurrent import futures

import grpc
import pytest
from helpers import variant_store
from prometheus_client import CollectorRegistry

from cloud.build.store import PortfolioStore, StoreError
from cloud.service import serve_command, server
from cloud.service.catalog import Catalog, check_store
from cloud.service.coordinator import BIND_TIMEOUT_S, CoordinatorServicer
from cloud.service.deploys import DeployConfig
from cloud.service.fleet_db import FleetDB
from cloud.service.report_writer import ReportWriter
from cloud.service.rollout import Rollouts, canaries
from cloud.service.store_checks import StoreLimits, resolve_under
from common.files import portfolio_id
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    variant_store(root / "good", widths=(0.125,))
    return root


def _manifest(store_dir):
    return json.loads((store_dir / "manifest.json").read_text())


def test_paths_resolve_under_the_root_and_nowhere_else(root, tmp_path):
    outside = variant_store(tmp_path / "outside", widths=(0.125,)).root
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "link-in").symlink_to(root / "good", target_is_directory=True)
    assert resolve_under(root, "good") == (root / "good").resolve()
    assert resolve_under(root, str(root / "good")) == (root / "good").resolve()
    assert resolve_under(root, "link-in") == (root / "good").resolve()  # a symlink that stays inside
    for escape in ("../outside", str(outside), "link-out", "good/../../outside", "/"):
        with pytest.raises(StoreError, match="outside the portfolio root"):
            resolve_under(root, escape)
    with pytest.raises(StoreError, match="no directory"):
        resolve_under(root, "missing")


def test_a_store_is_refused_for_a_symlinked_file_a_list_manifest_sizes_and_a_claimed_id(root, tmp_path):
    good = PortfolioStore(root / "good")
    served = check_store(good)
    assert served.portfolio_id == portfolio_id([v.variant_id for v in served.variants])
    entry = served.variants[0]
    path = good.variant_path(entry.variant_id)

    with pytest.raises(StoreError, match="at most 1024 bytes"):
        check_store(good, StoreLimits(max_manifest_bytes=1024))
    with pytest.raises(StoreError, match="at most 1000 bytes"):
        check_store(good, StoreLimits(max_file_bytes=1000))

    moved = tmp_path / "elsewhere.safetensors"  # a variant file that is a symlink (to the same bytes)
    os.replace(path, moved)
    path.symlink_to(moved)
    with pytest.raises(StoreError, match="symlink"):
        check_store(good)
    os.replace(moved, path)

    raw = _manifest(good.root)
    claimed = "0123456789abcdef"
    (good.root / "manifest.json").write_text(json.dumps({**raw, "portfolio_id": claimed}))
    with pytest.raises(StoreError, match=f"claims portfolio id '{claimed}'.*make {served.portfolio_id}"):
        check_store(good)
    for bad, words in (([raw], "JSON list, not the JSON object"), ({"variants": 3}, "not a portfolio manifest")):
        (good.root / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(StoreError, match=words):
            check_store(good)


def test_a_catalogued_store_whose_files_changed_is_not_served_after_a_restart(root, tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    first = variant_store(tmp_path / "first", widths=(0.125,))
    catalog = Catalog(db)
    catalog.start_with(first.root)
    second = catalog.add(root / "good").portfolio_id
    changed = PortfolioStore(root / "good").variant_path(catalog.manifest(second).variants[0].variant_id)
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")  # same size, other bytes
    again = Catalog(db)  # the cloud starts again
    assert not again.known(second) and again.known(first.manifest().portfolio_id)
    assert "does not hash" in again.withdrawn()[second]
    db.close()


def test_canaries_are_named_or_the_earliest_registered_never_a_new_name():
    registered = [("edge-b", 10.0), ("edge-a", 11.0), ("-", 99.0)]  # "-" sorts first, registered last
    edges = ["-", "edge-a", "edge-b"]
    assert canaries(edges, "", 1, registered, began=99.5) == ["edge-b"]
    assert canaries(edges, "", 5, registered, began=50.0) == ["edge-b", "edge-a"]  # "-" came after it began
    assert canaries(edges, "edge-a", 1, registered, began=99.5) == ["edge-a"]
    with pytest.raises(ValueError, match="not among the edges"):
        canaries(edges, "edge-a,ghost", 1, registered, began=99.5)


class _Pushes(list):
    def __call__(self, edge, listing):
        self.append((edge, listing.portfolio_id))


def test_rollouts_and_policies_commit_synchronously_before_a_directive_goes_out(root, tmp_path):
    now = [1000.0]
    db = FleetDB(tmp_path / "fleet.sqlite", clock=lambda: now[0])
    catalog = Catalog(db)
    catalog.start_with(variant_store(tmp_path / "first", widths=(0.125,)).root)
    second = catalog.add(root / "good").portfolio_id
    for name in ("edge-a", "edge-b"):
        db.register(coordinator_pb2.RegisterRequest(edge=name))
    now[0] = 1001.0
    db.register(coordinator_pb2.RegisterRequest(edge="-"))  # just before the deploy
    statements, pushed = [], _Pushes()
    db._db.set_trace_callback(statements.append)
    seen_at_push = []
    rollouts = Rollouts(
        db, catalog, db.policy, lambda e, p: (seen_at_push.append(len(statements)), pushed(e, p)), lambda: now[0]
    )
    rollout = rollouts.deploy(coordinator_pb2.DeployRequest(portfolio=second))
    assert list(rollout.canary_edges) == ["edge-a"] and pushed[0] == ("edge-a", second)
    trace = statements[: seen_at_push[0]]
    full, begin, commit = (trace.index(s) for s in ("PRAGMA synchronous=FULL", "BEGIN IMMEDIATE", "COMMIT"))
    assert full < begin < commit and any("INSERT INTO rollouts" in s for s in trace[begin:commit])
    assert any("listing_version" in s for s in trace[begin:commit])  # the new listing version commits with it
    statements.clear()
    db.set_policy(coordinator_pb2.Policy(slo_ms=20.0))
    assert statements[0] == "PRAGMA synchronous=FULL" and statements[-1] == "PRAGMA synchronous=NORMAL"
    db.close()


def test_a_rollback_completes_while_a_deploy_is_being_hashed(root, tmp_path):
    hashing, released, large = threading.Event(), threading.Event(), threading.Event()

    def progress(_):  # every MiB hashed: held up while the large store is hashed
        if large.is_set():
            hashing.set()
            released.wait(30)

    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    catalog = Catalog(db, progress=progress)
    catalog.start_with(variant_store(tmp_path / "first", widths=(0.125,)).root)
    reports = ReportWriter(db)
    coordinator = CoordinatorServicer(db, catalog, time.time, reports, deploys=DeployConfig(root))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(coordinator, server)
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
    )
    server.start()
    try:
        db.register(coordinator_pb2.RegisterRequest(edge="edge-a"))
        first = stub.Deploy(coordinator_pb2.DeployRequest(portfolio="good"), timeout=10).rollout
        variant_store(root / "large", widths=(0.25,))  # over 1 MiB: hashed in more than one block
        large.set()
        later = futures.ThreadPoolExecutor(1).submit(
            stub.Deploy, coordinator_pb2.DeployRequest(portfolio="large"), timeout=60
        )
        assert hashing.wait(30), "the large store was never hashed"
        back = stub.Rollback(coordinator_pb2.RollbackRequest(rollout_id=first.id), timeout=10).rollout
        assert back.state == "rolled_back" and not later.done()
        released.set()
        assert later.result(60).rollout.state == "canary"
    finally:
        released.set()
        server.stop(0)
        reports.close()
        db.close()


def test_a_manifest_claiming_another_portfolio_id_never_takes_its_place(root, tmp_path):
    db = FleetDB(tmp_path / "fleet.sqlite", clock=time.time)
    catalog = Catalog(db)
    first = variant_store(tmp_path / "first", widths=(0.125,))
    catalog.start_with(first.root)
    current = catalog.current()
    raw = _manifest(root / "good")
    (root / "good" / "manifest.json").write_text(json.dumps({**raw, "portfolio_id": current}))
    with pytest.raises(StoreError, match=f"claims portfolio id '{current}'"):
        catalog.add(root / "good")
    listed = catalog.listing(current)
    # the same members in another store, claiming other figures: the listing served stays as it was
    copy = PortfolioStore(tmp_path / "copy")
    for entry in first.manifest().variants:
        copy.put_variant(first.variant_path(entry.variant_id).read_bytes())
    boasting = first.manifest()
    copy.write_manifest(
        dataclasses.replace(boasting, variants=tuple(dataclasses.replace(v, accuracy=0.99) for v in boasting.variants))
    )
    assert catalog.add(copy.root).portfolio_id == current and catalog.listing(current) == listed
    assert all(v.accuracy < 0.99 for v in catalog.listing(current).variants)
    db.close()


def test_upload_pieces_that_do_not_parse_are_invalid_argument_and_leave_nothing(tmp_path):
    store = variant_store(tmp_path / "store", widths=(0.125,))
    config = server.CloudConfig(
        store=store.root,
        transport=Transport.plaintext(),
        db=tmp_path / "fleet.sqlite",
        deploys=DeployConfig(uploads_dir=tmp_path / "uploads"),
    )
    running = server.start(config, CollectorRegistry())
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        upload = channel.stream_unary("/prunefleet.v1.CoordinatorService/UploadPortfolio")
        for garbage in ([b"\xff\xff\xff"], [b"\x0a\x05manif"], []):
            with pytest.raises(grpc.RpcError) as refused:
                upload(iter(garbage), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert "upload refused" in refused.value.details()
        assert list((tmp_path / "uploads").iterdir()) == []
    finally:
        running.stop(0)


def test_the_deploy_flags_make_the_settings_and_bad_values_name_the_setting(tmp_path):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser, environ={})
    flags = ["--store", str(tmp_path), "--insecure", "--db", str(tmp_path / "db" / "fleet.sqlite")]
    config = serve_command.config(parser.parse_args([*flags, "--portfolio-root", str(tmp_path)]))
    assert config.deploys == DeployConfig(portfolio_root=tmp_path, uploads_dir=tmp_path / "db" / "uploads")
    assert serve_command.config(parser.parse_args(flags)).deploys.portfolio_root is None
    for bad, setting in (
        (["--portfolio-root", str(tmp_path / "missing")], "portfolio_root"),
        (["--max-upload-mib", "0"], "max_upload_bytes"),
    ):
        with pytest.raises(ValueError, match=setting):
            serve_command.config(parser.parse_args([*flags, *bad]))
    with pytest.raises(ValueError, match="max_manifest_bytes"):
        StoreLimits(max_manifest_bytes=10)


def test_the_bind_timeout_flag_sets_how_long_a_silent_stream_stays_open(tmp_path):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser, environ={})
    flags = ["--store", str(tmp_path), "--insecure"]
    assert serve_command.config(parser.parse_args(flags)).bind_timeout_s == BIND_TIMEOUT_S
    assert serve_command.config(parser.parse_args([*flags, "--bind-timeout", "2.5"])).bind_timeout_s == 2.5
    with pytest.raises(ValueError, match="bind_timeout_s must be in"):
        serve_command.config(parser.parse_args([*flags, "--bind-timeout", "0"]))
