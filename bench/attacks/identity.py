"""Attacks on who is who: an edge speaking for another, a name chosen to become the canary, a server
holding an edge certificate posing as the cloud, and edge and client certificates calling what only
the operator or an edge may call."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import grpc

from bench.attacks.arena import CLIENT, RPC_S, Arena, checked, cli
from bench.attacks.calls import DENIED, OK, Silence, code, refused, stranger_holder, telemetry
from bench.attacks.records import Finding, Refusals
from cloud.localfleet import commands
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc, inference_pb2, portfolio_pb2, portfolio_pb2_grpc

AGENT_S = 60.0  # at most this long for a real agent pointed at the impostor to try to register
REFUSED_IN_LOG = "cannot register"  # what the agent logs when a registration attempt fails
NEWCOMER = "0-newcomer"  # sorts before every other edge name
HONEST = "127.0.0.1:50999"  # the address edge-b registers under itself
EVIL = "127.0.0.1:6666"


def _address(arena: Arena, edge: str) -> str:
    edges = {e.edge: e.address for e in arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S).edges}
    return edges.get(edge, "")


def impersonation(arena: Arena) -> Finding:
    found = Refusals()
    arena.register("edge-a")
    arena.register("edge-b", HONEST)
    mine = arena.coordinator("edge-a")
    forged = code(lambda: mine.Register(coordinator_pb2.RegisterRequest(edge="edge-b", address=EVIL), timeout=RPC_S))
    found.check("Register as edge-b with edge-a's certificate", forged == DENIED, forged.name)
    kept = _address(arena, "edge-b")
    found.check("edge-b's address afterwards", kept == HONEST, f"{kept} (registered {HONEST})")
    silence = Silence(hold_s=RPC_S)
    try:
        for label, sent in (
            ("a first report naming edge-b", [telemetry("edge-b")]),
            ("a report naming edge-b after binding as edge-a", [telemetry("edge-a"), telemetry("edge-b")]),
        ):
            status = code(lambda sent=sent: mine.Connect(silence.stream(*sent), timeout=RPC_S))
            found.check(f"Connect with {label}", status == DENIED, status.name)
    finally:
        silence.end()
    client = Transport.load(arena.holder(CLIENT))
    as_client = portfolio_pb2_grpc.PortfolioServiceStub(
        Transport.holding(client.ca, client.cert, client.key).channel(arena.cloud.address)
    )
    variant = arena.portfolio("edge-a").ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_S).variants[0]
    request = portfolio_pb2.FetchVariantRequest(variant_id=variant.variant_id)
    status = code(lambda: as_client.FetchVariant(request, timeout=RPC_S))
    found.check("download with the client certificate", status == DENIED, status.name)
    _, key, cert = stranger_holder("edge-b")
    ca = arena.transport("edge-a").ca
    stranger = portfolio_pb2_grpc.PortfolioServiceStub(Transport.holding(ca, cert, key).channel(arena.cloud.address))
    status = code(lambda: stranger.FetchVariant(request, timeout=RPC_S))
    found.check("download with a certificate naming edge-b from another CA", refused(status), status.name)
    return found.finding()


def _check_canaries(arena: Arena, found: Refusals, intruder: str) -> None:
    """Deploy "next" without --edges or --canaries (every edge), check `intruder` is no canary of it, and
    roll the rollout back."""
    request = coordinator_pb2.DeployRequest(portfolio=str(arena.stores["next"]))
    try:
        rollout = arena.operator.Deploy(request, timeout=60).rollout
    except grpc.RpcError as err:
        found.check("deploy without --edges", False, f"the deploy itself failed: {err.code().name} {err.details()}")
        return
    canaries = list(rollout.canary_edges)
    try:
        found.check(
            "canaries of the deploy", intruder not in canaries and set(canaries) <= {"edge-a", "edge-b"}, str(canaries)
        )
    finally:
        arena.operator.Rollback(coordinator_pb2.RollbackRequest(rollout_id=rollout.id, reason="attack"), timeout=RPC_S)


def canary_name(arena: Arena) -> Finding:
    """Register "-" (sorts before every real name) with another edge's certificate, then deploy."""
    found = Refusals()
    arena.register("edge-a")
    arena.register("edge-b", HONEST)
    status = code(
        lambda: arena.coordinator("edge-a").Register(coordinator_pb2.RegisterRequest(edge="-"), timeout=RPC_S)
    )
    found.check('Register "-" with edge-a\'s certificate', status == DENIED, status.name)
    _check_canaries(arena, found, "-")
    return found.finding()


def canary_newcomer(arena: Arena) -> Finding:
    """An edge with a certificate of its own for a new name that sorts first registers just before a deploy."""
    found = Refusals()
    arena.register("edge-a")
    arena.register("edge-b", HONEST)
    checked(cli("certs", "issue", "edge", NEWCOMER, "--certs-dir", str(arena.certs)))
    arena.register(NEWCOMER)
    _check_canaries(arena, found, NEWCOMER)
    return found.finding()


def _impostor_certs(arena: Arena):
    """A cloud directory holding edge-b's certificate and key, with the token and signing key copied in:
    the worst case, an impostor lacking nothing but the cloud's own certificate."""
    directory = arena.work / "impostor-certs"
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (directory / name).write_bytes((arena.holder("edge-b") / name).read_bytes())
    for name in ("token", "signing.key"):
        (directory / name).write_bytes((arena.holder("cloud") / name).read_bytes())
    return directory


def _registered(db) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        return [row[0] for row in connection.execute("SELECT name FROM edges")]


def _agent_refusals(arena: Arena, address: str) -> int:
    """Start a real agent (edge-a) against `address`; once its log shows a registration that failed (or
    after AGENT_S), stop it. Returns how many of its attempts failed."""
    args = commands.edge_args(address, "edge-a", cache=arena.work / "impostor-edge-cache", certs=arena.holder("edge-a"))
    log = arena.logs / "edge-a-at-impostor.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + AGENT_S
        while (
            time.monotonic() < deadline
            and agent.poll() is None
            and REFUSED_IN_LOG not in log.read_text("utf-8", "replace")
        ):
            time.sleep(0.2)
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return log.read_text("utf-8", "replace").count(REFUSED_IN_LOG)


def edge_cert_as_cloud(arena: Arena) -> Finding:
    found = Refusals()
    impostor = arena.start_cloud("impostor", _impostor_certs(arena))
    try:
        status = cli("fleet", "status", "--cloud", impostor.address, "--certs", str(arena.holder("operator")))
        found.check(
            "prunefleet fleet status (operator certificate) at it",
            status.returncode != 0,
            f"exit {status.returncode}: {status.stderr.strip()[-160:]}",
        )
        refusals = _agent_refusals(arena, impostor.address)
        seen = _registered(arena.work / "impostor.sqlite")
        found.check(
            "a real edge agent pointed at it",
            refusals > 0 and not seen,
            f"{refusals} registration attempt(s) failed in the handshake; edges in its database: {seen or 'none'}",
        )
        health = arena.coordinator("edge-a", impostor.address)
        status = code(lambda: health.Register(coordinator_pb2.RegisterRequest(edge="edge-a"), timeout=RPC_S))
        found.check("an edge's own channel (Register)", status != OK, status.name)
    finally:
        arena.stop(impostor)
    return found.finding()


def _with_token(arena: Arena, who: str) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    """`who`'s certificate carrying the operator token too (the worst case: the token leaked)."""
    held, token = arena.transport(who), arena.transport("operator", token=True).token
    return coordinator_pb2_grpc.CoordinatorServiceStub(
        Transport(held.ca, held.cert, held.key, token, arena.transport("operator").server_name).channel(
            arena.cloud.address
        )
    )


def wrong_role_calls(arena: Arena) -> Finding:
    found = Refusals()
    arena.register("edge-a")
    calls = {
        "Deploy": lambda s: s.Deploy(coordinator_pb2.DeployRequest(portfolio=str(arena.stores["next"])), timeout=RPC_S),
        "SetPolicy": lambda s: s.SetPolicy(
            coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=1.0)), timeout=RPC_S
        ),
        "Pin": lambda s: s.Pin(coordinator_pb2.PinRequest(edges="*", variant_id=""), timeout=RPC_S),
        "Rollback": lambda s: s.Rollback(coordinator_pb2.RollbackRequest(rollout_id=0), timeout=RPC_S),
    }
    for who in ("edge-a", CLIENT):
        stub = _with_token(arena, who)
        for method, call in calls.items():
            status = code(lambda call=call, stub=stub: call(stub))
            found.check(f"{method} with the {who} certificate and the token", status == DENIED, status.name)
    client = arena.transport(CLIENT)
    as_client = coordinator_pb2_grpc.CoordinatorServiceStub(
        Transport(client.ca, client.cert, client.key, "", arena.transport("edge-a").server_name).channel(
            arena.cloud.address
        )
    )
    status = code(lambda: as_client.Register(coordinator_pb2.RegisterRequest(edge=CLIENT), timeout=RPC_S))
    found.check("Register with a client certificate", status == DENIED, status.name)
    edge = arena.edge()
    as_edge = arena.inference("edge-b", edge.address)
    status = code(lambda: as_edge.Describe(inference_pb2.DescribeRequest(), timeout=RPC_S))
    found.check("Describe at a real edge with edge-b's certificate", status == DENIED, status.name)
    policy = arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S).policy
    found.check("the policy afterwards", policy.slo_ms != 1.0, f"slo_ms {policy.slo_ms:g}")
    return found.finding()
