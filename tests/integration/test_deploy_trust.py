"""Deploys the cloud can trust, against a real cloud process on loopback with the certificates
`prunefleet certs init` writes: a deploy by path stays under `--portfolio-root` (no `..`, no absolute
path elsewhere, no symlink out of it, no symlinked variant file), a manifest that is no JSON object or
claims another portfolio's id is refused naming the problem, canaries cannot be taken by a name
registered just before the deploy, a store is uploaded by the operator alone (and is how a cloud
without a root is deployed to), and a catalogued store whose files changed is not served after a
restart, which `GetFleet` and `prunefleet fleet status` report."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from helpers import variant_store

from cloud.admin import upload_client
from cloud.localfleet import commands, processes
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.integration
PRUNEFLEET = str(Path(sys.executable).parent / "prunefleet")
S = grpc.StatusCode


def _cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PRUNEFLEET, *args], capture_output=True, text=True, timeout=120)
    assert not check or result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trust") / "certs"
    _cli("certs", "init", str(directory))
    for name in ("edge-a", "edge-b", "-"):
        _cli("certs", "issue", "edge", name, "--certs-dir", str(directory))
    return directory


def _start(work: Path, certs_dir: Path, name: str, root: Path | None) -> processes.Child:
    args = commands.cloud_args(work / "first", db=work / "fleet.sqlite", certs=certs_dir / "cloud")
    return processes.start(name, [*args, *(["--portfolio-root", str(root)] if root else [])], work / "logs")


def _stub(certs_dir: Path, who: str, address: str, token: bool = False):
    holder = certs_dir / who if who in ("operator", "cloud") else certs_dir / "edges" / who
    return coordinator_pb2_grpc.CoordinatorServiceStub(Transport.load(holder, token=token).channel(address))


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    raise AssertionError("the call was not refused")


def _stores(work: Path) -> dict[str, Path]:
    """The first portfolio, and under the root a good store and one broken way per case."""
    variant_store(work / "first", widths=(0.125,))
    root, outside = work / "root", variant_store(work / "outside", widths=(0.0625,)).root
    good = variant_store(root / "good", widths=(0.125, 0.0625)).root
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    linked = variant_store(root / "linked-file", widths=(0.0625,)).root
    member = next((linked / "variants").iterdir())
    os.replace(member, work / "moved")
    member.symlink_to(work / "moved")
    listed = variant_store(root / "listed", widths=(0.0625,)).root
    (listed / "manifest.json").write_text(json.dumps([json.loads((listed / "manifest.json").read_text())]))
    claiming = variant_store(root / "claiming", widths=(0.0625,)).root
    raw = json.loads((claiming / "manifest.json").read_text())
    first = json.loads((work / "first" / "manifest.json").read_text())["portfolio_id"]
    (claiming / "manifest.json").write_text(json.dumps({**raw, "portfolio_id": first}))
    return {"root": root, "outside": outside, "good": good, "first": work / "first"}


def test_deploys_by_path_stay_under_the_root_and_canaries_are_not_taken_by_a_new_name(certs_dir, tmp_path):
    stores = _stores(tmp_path)
    cloud = _start(tmp_path, certs_dir, "cloud", stores["root"])
    try:
        operator = _stub(certs_dir, "operator", cloud.address, token=True)
        for edge in ("edge-a", "edge-b"):
            _stub(certs_dir, edge, cloud.address).Register(coordinator_pb2.RegisterRequest(edge=edge), timeout=10)
            time.sleep(0.05)
        cases = {
            "../outside": "outside the portfolio root",
            str(stores["outside"]): "outside the portfolio root",
            "link-out": "outside the portfolio root",
            str(stores["first"]): "outside the portfolio root",  # the store the cloud started with: by id only
            "linked-file": "symlink",
            "listed": "JSON list, not the JSON object",
            "claiming": "claims portfolio id",
        }
        for path, words in cases.items():
            code, details = _refusal(
                lambda p=path: operator.Deploy(coordinator_pb2.DeployRequest(portfolio=p), timeout=30)
            )
            assert (code, words in details) == (S.INVALID_ARGUMENT, True), (path, details)

        # "-" sorts before every name and registers just before the deploy: it must not be the canary
        _stub(certs_dir, "-", cloud.address).Register(coordinator_pb2.RegisterRequest(edge="-"), timeout=10)
        rollout = operator.Deploy(coordinator_pb2.DeployRequest(portfolio="good", canary=1), timeout=30).rollout
        assert list(rollout.canary_edges) == ["edge-a"] and "-" in rollout.edges
        flags = ["--cloud", cloud.address, "--certs", str(certs_dir / "operator")]
        _cli("rollback", *flags)
        out = _cli("deploy", rollout.portfolio_id, "--canaries", "edge-b", *flags).stdout
        assert "canary edge-b)" in out
        _cli("rollback", *flags)
    finally:
        cloud.stop()


def test_uploads_are_the_operators_alone_and_a_changed_store_is_not_served_after_a_restart(certs_dir, tmp_path):
    variant_store(tmp_path / "first", widths=(0.125,))
    here = variant_store(tmp_path / "here", widths=(0.125, 0.0625)).root  # on the operator's side
    cloud = _start(tmp_path, certs_dir, "cloud", None)
    flags = ["--certs", str(certs_dir / "operator")]
    try:
        _stub(certs_dir, "edge-a", cloud.address).Register(coordinator_pb2.RegisterRequest(edge="edge-a"), timeout=10)
        operator = _stub(certs_dir, "operator", cloud.address, token=True)
        code, details = _refusal(
            lambda: operator.Deploy(coordinator_pb2.DeployRequest(portfolio=str(here)), timeout=30)
        )
        assert code == S.FAILED_PRECONDITION and "--portfolio-root" in details
        for who, token, refused in (("edge-a", False, S.PERMISSION_DENIED), ("operator", False, S.UNAUTHENTICATED)):
            stub = _stub(certs_dir, who, cloud.address, token=token)
            assert _refusal(lambda s=stub: s.UploadPortfolio(upload_client.pieces(here), timeout=30))[0] == refused

        out = _cli("deploy", str(here), "--cloud", cloud.address, *flags).stdout  # no root: uploaded
        uploaded = out.split("uploaded portfolio ")[1].split()[0]
        assert "rollout 1 " in out and "canary edge-a)" in out
        _cli("rollback", "--cloud", cloud.address, *flags)
        stored = tmp_path / "uploads" / uploaded
        assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == [uploaded]
    finally:
        cloud.stop()

    member = next((stored / "variants").iterdir())
    member.write_bytes(member.read_bytes()[:-1] + b"\1")  # changed while the cloud was down
    cloud = _start(tmp_path, certs_dir, "cloud-again", None)
    try:
        operator = _stub(certs_dir, "operator", cloud.address, token=True)
        fleet = operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=10)
        assert [w.split(":")[0] for w in fleet.withdrawn_portfolios] == [uploaded]
        assert "does not hash" in fleet.withdrawn_portfolios[0]
        assert (
            f"withdrawn (no longer served): {uploaded}"
            in _cli("fleet", "status", "--cloud", cloud.address, *flags).stdout
        )
        code, details = _refusal(lambda: operator.Deploy(coordinator_pb2.DeployRequest(portfolio=uploaded), timeout=30))
        assert code == S.INVALID_ARGUMENT and "not known" in details
    finally:
        cloud.stop()
