"""A replayed older listing, a listing with a changed accuracy and an expired one, fed to a real edge.

The attacker holds the cloud's TLS certificate and key (a compromised front end) but not the signing
key, and replays what the real cloud once sent. Edge-c holds portfolio "base"; the arena's cloud
deploys "next" to it (a new listing version) and edge-c takes it; the older listing (base, under the
version before) was captured before the deploy. Then edge-c is restarted against `ReplayCloud`:

    Register       the older listing first (the restarted edge must refuse it: its newest accepted
                   version is on disk), then the listing it holds (taken: the same version, same bytes)
    Connect        once it serves: the held listing with one member's accuracy raised (the signature
                   no longer matches), a listing of a newer version signed with the cloud's key (read
                   from the arena's certificates, so that expiry is the only thing wrong with it) that
                   expired an hour ago, and the older listing again, last (taken, it would stay)

Refused when edge-c counts each refusal by its reason (`prunefleet_edge_listings_refused_total`:
older_version twice, bad_signature, expired) and every telemetry window it sends names the held
portfolio, none the older one.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent import futures

import grpc

from bench.attacks.arena import RPC_S, Arena
from bench.attacks.records import Finding, Refusals
from common import listing as listings
from common.security import SIGNING_KEY, Signer
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2, portfolio_pb2_grpc

CHUNK = 1 << 20
ADOPT_S = 60.0  # for the edge to hold the newer portfolio
REPLAY_S = {False: 30.0, True: 20.0}  # by quick: for the refusals and windows once the edge serves
EXPECTED = {"older_version": 2, "bad_signature": 1, "expired": 1}
REFUSED = re.compile(r'^prunefleet_edge_listings_refused_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', re.M)


class ReplayCloud(coordinator_pb2_grpc.CoordinatorServiceServicer, portfolio_pb2_grpc.PortfolioServiceServicer):
    """Answers Register with `registers` in turn (the last one again and again), sends `directives`'
    listings on Connect after the policy, and notes the portfolio of every telemetry window."""

    def __init__(self, registers: list, directives: list, policy: coordinator_pb2.Policy, files):
        self._registers, self._directives, self.policy, self._files = list(registers), directives, policy, files
        self.held: list[str] = []  # the portfolio of every window the edge sent
        self.stopped = threading.Event()

    def Register(self, request, context):
        listing = self._registers.pop(0) if len(self._registers) > 1 else self._registers[0]
        return coordinator_pb2.RegisterResponse(
            policy=self.policy, variants=listing.variants, portfolio_id=listing.portfolio_id, portfolio=listing
        )

    def Connect(self, request_iterator, context):
        def read():
            for report in request_iterator:
                if report.HasField("telemetry"):
                    self.held.append(report.telemetry.portfolio_id)

        threading.Thread(target=read, daemon=True).start()
        yield coordinator_pb2.Directive(policy=self.policy)
        for listing in self._directives:
            yield coordinator_pb2.Directive(portfolio=listing)
        while not self.stopped.wait(1.0) and context.is_active():
            yield coordinator_pb2.Directive()

    def ListVariants(self, request, context):
        return self._registers[-1]

    def FetchVariant(self, request, context):
        data = self._files(request.variant_id).read_bytes()
        for offset in range(request.offset, len(data), CHUNK):
            yield portfolio_pb2.VariantChunk(
                offset=offset, data=data[offset : offset + CHUNK], total_size=len(data), sha256=request.variant_id
            )


def _wait_holding(arena: Arena, edge: str, portfolio_id: str) -> bool:
    deadline = time.monotonic() + ADOPT_S
    while time.monotonic() < deadline:
        fleet = arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S)
        if any(e.edge == edge and e.reported_portfolio_id == portfolio_id for e in fleet.edges):
            return True
        time.sleep(0.5)
    return False


def _serve(arena: Arena, replay: ReplayCloud) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(replay, server)
    portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server(replay, server)
    port = server.add_secure_port("127.0.0.1:0", arena.transport("cloud").server_credentials())
    server.start()
    return server, f"127.0.0.1:{port}"


def _forged(arena: Arena, held: portfolio_pb2.ListVariantsResponse) -> list[portfolio_pb2.ListVariantsResponse]:
    """The held listing with one member's accuracy raised (its signature kept), and a newer version
    signed with the cloud's own key that expired an hour ago."""
    tampered = portfolio_pb2.ListVariantsResponse()
    tampered.CopyFrom(held)
    tampered.variants[0].accuracy = min(1.0, tampered.variants[0].accuracy + 0.25)
    signer = Signer.load(arena.holder("cloud") / SIGNING_KEY)
    expired = listings.signed(held, held.version + 1, int(time.time()) - 3600, signer)
    return [tampered, expired]


def _files(arena: Arena):
    """A variant file of either store, by its id."""
    folders = [arena.stores[name] / "variants" for name in ("base", "next")]
    return lambda file_id: next(path for folder in folders for path in folder.glob(f"{file_id}.*"))


def _refusals(metrics_address: str) -> dict[str, int]:
    """The edge's listing refusals by reason, from its metrics endpoint."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=RPC_S) as reply:
        text = reply.read().decode()
    return {reason: int(float(count)) for reason, count in REFUSED.findall(text)}


def _captured(arena: Arena, edge: str) -> tuple:
    """The listing the cloud serves now (to be replayed later), and the deploy of "next" to `edge`."""
    arena.edge()
    older = arena.portfolio(edge).ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_S)
    request = coordinator_pb2.DeployRequest(
        portfolio=str(arena.stores["next"]),
        edges=edge,
        thresholds=coordinator_pb2.RolloutThresholds(min_windows=10_000, adopt_timeout_s=600),
    )
    return older, arena.operator.Deploy(request, timeout=60).rollout


def _replayed(arena: Arena, replay: ReplayCloud, found: Refusals, older: str, held: str) -> None:
    """Edge-c started against the replayer; what it refused and what its windows name, checked."""
    server, address = _serve(arena, replay)
    try:
        child = arena.start_edge("edge-c", arena.edge_cache, address, timeout_s=60)
        deadline, refused = time.monotonic() + REPLAY_S[arena.quick], {}
        while time.monotonic() < deadline and (refused != EXPECTED or len(replay.held) < 2):
            time.sleep(0.5)
            refused = _refusals(child.metrics_address)
    finally:
        replay.stopped.set()
        server.stop(0)
    counted = {reason: refused.get(reason, 0) for reason in EXPECTED}
    took, kept = replay.held.count(older), replay.held.count(held)
    found.measured = {"refused": refused, "windows": len(replay.held), "windows_on_older": took}
    found.check(
        "restarted edge-c given the older listing at Register, then in a directive",
        counted["older_version"] == 2,
        f"refused as older {counted['older_version']} of 2 times",
    )
    for part, reason in (("the held listing, a member's accuracy raised", "bad_signature"), ("expired", "expired")):
        found.check(part, counted[reason] == 1, f"refused as {reason} {counted[reason]} of 1 times")
    found.check(
        "edge-c's windows", not took and kept == len(replay.held) > 0, f"{took} on the older, {kept} on the held"
    )


def replayed_listing(arena: Arena) -> Finding:
    found = Refusals()
    older, rollout = _captured(arena, "edge-c")
    policy = arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S).policy
    try:
        if not _wait_holding(arena, "edge-c", rollout.portfolio_id):
            found.check("set-up: edge-c holds the newer portfolio", False, f"not within {ADOPT_S:g} s")
            return found.finding()
        arena.stop(arena.edge())
        register = coordinator_pb2.RegisterRequest(edge="edge-c", address="127.0.0.1:1")
        current = arena.coordinator("edge-c").Register(register, timeout=RPC_S).portfolio  # the listing it holds
        if not current.version > older.version:
            found.check(
                "set-up: the deploy issued a newer listing", False, f"v{current.version} after v{older.version}"
            )
            return found.finding()
        replay = ReplayCloud([older, current], [*_forged(arena, current), older], policy, _files(arena))
        _replayed(arena, replay, found, older.portfolio_id, current.portfolio_id)
    finally:
        arena.operator.Rollback(coordinator_pb2.RollbackRequest(rollout_id=rollout.id, reason="attack"), timeout=RPC_S)
        for child in [c for c in arena.children if c.name == "edge-c"]:
            arena.stop(child)
    return found.finding()
