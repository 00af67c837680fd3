"""Idle-stream flood: more `Connect` streams than the cloud's `--max-rpcs`, each from an edge certificate
of its own and none ever reporting, while the operator lists rollouts and rolls one back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from bench.attacks.arena import MAX_RPCS, RPC_S, Arena
from bench.attacks.calls import OK, Silence, code, telemetry
from bench.attacks.records import Finding, Refusals
from cloud.admin import certs
from common.security import Transport
from common.wire import CHANNEL_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc

STREAMS = MAX_RPCS + 4
SLACK_S = 5.0  # for a loaded machine


class Stream:
    """One idle stream, read on a thread of its own: when it opened, and how and when it ended."""

    def __init__(self, stub, silence: Silence):
        self.opened_at = time.monotonic()
        self.call = stub.Connect(silence.stream(), timeout=120)
        self.first = threading.Event()
        self.ended_at, self.code = 0.0, None

    def read(self) -> None:
        try:
            for _ in self.call:
                self.first.set()
            self.code = OK
        except grpc.RpcError as err:
            self.code = err.code()
        self.ended_at = time.monotonic()
        self.first.set()

    @property
    def admitted(self) -> bool:
        return self.code != grpc.StatusCode.RESOURCE_EXHAUSTED


def _stub(arena: Arena, name: str):
    ca, key, cert = certs.issue_pems(arena.certs, "edge", name, days=1)
    transport = Transport.holding(ca, cert, key)
    options = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))
    return coordinator_pb2_grpc.CoordinatorServiceStub(transport.channel(arena.cloud.address, options))


def _operator_calls(arena: Arena, found: Refusals) -> None:
    operator = arena.operator
    deploy = coordinator_pb2.DeployRequest(portfolio=str(arena.stores["next"]), edges="edge-a")
    status = code(lambda: operator.Deploy(deploy, timeout=RPC_S))
    found.check("the operator's Deploy during the flood", status == OK, status.name)
    listed = []
    status = code(
        lambda: listed.extend(operator.ListRollouts(coordinator_pb2.ListRolloutsRequest(), timeout=RPC_S).rollouts)
    )
    found.check("the operator's ListRollouts during the flood", status == OK, status.name)
    latest = max((r.id for r in listed), default=0)
    back = coordinator_pb2.RollbackRequest(rollout_id=latest, reason="attack")
    status = code(lambda: operator.Rollback(back, timeout=RPC_S))
    found.check("the operator's Rollback during the flood", status == OK, status.name)


def idle_stream_flood(arena: Arena) -> Finding:
    found, silence = Refusals(), Silence(hold_s=120.0)
    arena.register("edge-a")
    stubs = [_stub(arena, f"flood-{i:02d}") for i in range(STREAMS)]
    streams: list[Stream] = []
    with ThreadPoolExecutor(STREAMS) as pool:
        try:
            for stub in stubs:
                stream = Stream(stub, silence)
                streams.append(stream)
                pool.submit(stream.read)
                stream.first.wait(RPC_S)
            admitted = [s for s in streams if s.admitted]
            found.measured = {"streams": STREAMS, "max_rpcs": MAX_RPCS, "admitted": len(admitted)}
            _operator_calls(arena, found)
            bound = arena.bind_timeout_s  # the cloud closes a stream that has not bound within this
            deadline = time.monotonic() + bound + SLACK_S + 5.0
            while any(s.code is None for s in streams) and time.monotonic() < deadline:
                time.sleep(0.1)
            lasted = [s.ended_at - s.opened_at for s in admitted if s.code is not None]
            found.measured["closed_within_s"] = round(max(lasted, default=0.0), 2)
            closed = len(lasted) == len(admitted) and all(s.code == grpc.StatusCode.DEADLINE_EXCEEDED for s in admitted)
            found.check(
                "the idle streams",
                closed and max(lasted, default=0.0) <= bound + SLACK_S,
                f"{len(admitted)} of {STREAMS} admitted, {len(lasted)} closed "
                f"({sorted({s.code.name for s in admitted if s.code})}) within {max(lasted, default=0.0):.1f} s",
            )
        finally:
            silence.end()
            for stream in streams:
                stream.call.cancel()
    bound = arena.coordinator("edge-a").Connect(iter([telemetry("edge-a")]), timeout=RPC_S)
    status = code(lambda: bound)
    found.check("an honest edge's stream afterwards", status == OK, status.name)
    return found.finding()
