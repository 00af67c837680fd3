"""A replayed older listing: an edge that holds a newer portfolio is offered the one before it again.

The attacker holds the cloud's TLS certificate and key (a compromised front end) but not the signing
key, and replays what the real cloud once sent: the older portfolio's listing, every variant with the
signature the cloud gave it. `ReplayCloud` answers an edge's Register, Connect, ListVariants and
FetchVariant with that recording and notes the portfolio each telemetry window says the edge holds.
The edge must refuse a listing older than the one it holds, whatever signatures it carries, so no
window from it may name the older portfolio (a variant signature alone covers the file, not the
listing: until listings are signed with a rising version this attack is not refused).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc

from bench.attacks.arena import RPC_S, Arena
from bench.attacks.records import Finding, Refusals
from cloud.localfleet import processes
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2, portfolio_pb2_grpc

CHUNK = 1 << 20
ADOPT_S = 60.0  # for the edge to hold the newer portfolio
REPLAY_S = {False: 8.0, True: 4.0}  # by quick: the edge's windows watched once it talks to the replayer


class ReplayCloud(coordinator_pb2_grpc.CoordinatorServiceServicer, portfolio_pb2_grpc.PortfolioServiceServicer):
    def __init__(self, listing: portfolio_pb2.ListVariantsResponse, policy: coordinator_pb2.Policy, variants):
        self.listing, self.policy, self._variants = listing, policy, variants
        self.held: list[str] = []  # the portfolio of every window the edge sent
        self.stopped = threading.Event()

    def Register(self, request, context):
        return coordinator_pb2.RegisterResponse(
            policy=self.policy, variants=self.listing.variants, portfolio_id=self.listing.portfolio_id
        )

    def Connect(self, request_iterator, context):
        def read():
            for report in request_iterator:
                if report.HasField("telemetry"):
                    self.held.append(report.telemetry.portfolio_id)

        threading.Thread(target=read, daemon=True).start()
        yield coordinator_pb2.Directive(policy=self.policy)
        yield coordinator_pb2.Directive(portfolio=self.listing)
        while not self.stopped.wait(1.0) and context.is_active():
            yield coordinator_pb2.Directive()

    def ListVariants(self, request, context):
        return self.listing

    def FetchVariant(self, request, context):
        data = self._variants(request.variant_id).read_bytes()
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


def replayed_listing(arena: Arena) -> Finding:
    found = Refusals()
    edge = arena.edge()
    older = arena.portfolio("edge-c").ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_S)
    policy = arena.operator.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=RPC_S).policy
    request = coordinator_pb2.DeployRequest(
        portfolio=str(arena.stores["next"]),
        edges="edge-c",
        thresholds=coordinator_pb2.RolloutThresholds(min_windows=10_000, adopt_timeout_s=600),
    )
    rollout = arena.operator.Deploy(request, timeout=60).rollout
    try:
        if not _wait_holding(arena, "edge-c", rollout.portfolio_id):
            found.check("set-up: edge-c holds the newer portfolio", False, f"not within {ADOPT_S:g} s")
            return found.finding()
        arena.stop(edge)
        replay = ReplayCloud(older, policy, lambda v: arena.stores["base"] / "variants" / f"{v}.safetensors")
        server, address = _serve(arena, replay)
        try:
            try:
                arena.start_edge("edge-c", arena.edge_cache, address, timeout_s=60)
                started = "it served again"
            except processes.ProcessError:
                started = "it did not serve"
            time.sleep(REPLAY_S[arena.quick])
        finally:
            replay.stopped.set()
            server.stop(0)
        took = replay.held.count(older.portfolio_id)
        found.measured = {"windows": len(replay.held), "windows_on_older": took}
        found.check(
            "edge-c, holding the newer portfolio, offered the older listing",
            not took,
            f"{started}; {took} of {len(replay.held)} windows report the older portfolio",
        )
    finally:
        arena.operator.Rollback(coordinator_pb2.RollbackRequest(rollout_id=rollout.id, reason="attack"), timeout=RPC_S)
        for child in [c for c in arena.children if c.name == "edge-c"]:
            arena.stop(child)
    return found.finding()
