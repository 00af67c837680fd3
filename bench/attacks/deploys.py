"""Attacks on what a deploy reads: a path out of the portfolio root (by `..` and by symlinks), a store
claiming the current portfolio's id, and a manifest that is a list, each sent as the operator's
`Deploy` (the CLI's request) to a cloud started with `--portfolio-root` where the cloud has that flag.

A deploy that goes through is rolled back at once, so the next attack is judged on its own request."""

from __future__ import annotations

import json
import os
import shutil

import grpc

from bench.attacks.arena import RPC_S, Arena
from bench.attacks.records import Finding, Refusals
from bench.fuzz.fleet import variant_bytes, write_store
from protos import coordinator_pb2, portfolio_pb2

REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
)


def _deploy(arena: Arena, portfolio: str) -> tuple[grpc.StatusCode, str, coordinator_pb2.Rollout | None]:
    """(status, details, the rollout if one started); a rollout that started is rolled back."""
    arena.register("edge-a")
    request = coordinator_pb2.DeployRequest(portfolio=portfolio, edges="edge-a")
    try:
        rollout = arena.operator.Deploy(request, timeout=60).rollout
    except grpc.RpcError as err:
        return err.code(), (err.details() or "")[:200], None
    back = coordinator_pb2.RollbackRequest(rollout_id=rollout.id, reason="attack")
    arena.operator.Rollback(back, timeout=RPC_S)
    return grpc.StatusCode.OK, f"rollout {rollout.id} of portfolio {rollout.portfolio_id} started", rollout


def _outside(arena: Arena):
    return write_store(arena.work / "outside" / "store", [variant_bytes(0.1875)])


def path_escape(arena: Arena) -> Finding:
    found = Refusals()
    outside = _outside(arena)
    linked = arena.root / "linked"
    if not linked.exists():
        linked.symlink_to(outside.root, target_is_directory=True)
    sneaky = arena.root / "sneaky"
    shutil.copytree(outside.root, sneaky, dirs_exist_ok=True)
    for member in (sneaky / "variants").iterdir():  # each member file a symlink out of the root
        member.unlink()
        member.symlink_to(outside.root / "variants" / member.name)
    attempts = {
        "`..` out of the root": str(arena.root / ".." / "outside" / "store"),
        "`..` relative to the root": os.path.join("..", "outside", "store"),
        "an absolute path outside the root": str(outside.root),
        "a symlink in the root to a store outside": str(linked),
        "a store in the root whose files are symlinks out of it": str(sneaky),
    }
    for label, portfolio in attempts.items():
        status, details, _ = _deploy(arena, portfolio)
        found.check(f"deploy of {label}", status in REFUSALS, f"{status.name}: {details}")
    return found.finding()


def _listing(arena: Arena) -> portfolio_pb2.ListVariantsResponse:
    return arena.portfolio("edge-a").ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_S)


def claimed_portfolio_id(arena: Arena) -> Finding:
    found = Refusals()
    before = _listing(arena)
    claimer = write_store(arena.root / "claimer", [variant_bytes(0.15625)])
    manifest = json.loads((claimer.root / "manifest.json").read_text())
    manifest["portfolio_id"] = before.portfolio_id  # the current portfolio's id, over other files
    (claimer.root / "manifest.json").write_text(json.dumps(manifest))
    status, details, rollout = _deploy(arena, str(claimer.root))
    claimed = rollout is not None and rollout.portfolio_id == before.portfolio_id
    found.check(
        "deploy of a store claiming the current id", status in REFUSALS or not claimed, f"{status.name}: {details}"
    )
    after = _listing(arena)
    same = after.portfolio_id == before.portfolio_id and [v.variant_id for v in after.variants] == [
        v.variant_id for v in before.variants
    ]
    found.check("the current listing afterwards", same, "unchanged" if same else "replaced by the claimer's files")
    return found.finding()


def manifest_list(arena: Arena) -> Finding:
    found = Refusals()
    listed = write_store(arena.root / "listed", [variant_bytes(0.09375)])
    (listed.root / "manifest.json").write_text(json.dumps([{"portfolio_id": "0" * 16}]))
    status, details, _ = _deploy(arena, str(listed.root))
    found.check(
        "deploy of a store whose manifest.json is a list",
        status == grpc.StatusCode.INVALID_ARGUMENT,
        f"{status.name}: {details}",
    )
    return found.finding()
