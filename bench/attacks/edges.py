"""Attacks on an edge's standing and its disk: a revoked certificate that still holds an open stream, and
a second agent started on another's cache directory."""

from __future__ import annotations

import re
import threading
import time

import grpc

from bench.attacks.arena import RPC_S, Arena, checked, cli
from bench.attacks.calls import DENIED, Silence, code, telemetry
from bench.attacks.records import Finding, Refusals
from cloud.localfleet import processes
from protos import coordinator_pb2, inference_pb2, portfolio_pb2

REVOKED_BOUND_S = 5.0
SECOND_AGENT_S = 60.0  # a second agent that has not exited by then is taken as having started


def _ended(stream, out: dict) -> None:
    try:
        for _ in stream:
            out.setdefault("first", time.monotonic())
        out["code"] = grpc.StatusCode.OK
    except grpc.RpcError as err:
        out["code"] = err.code()
    out["at"] = time.monotonic()


def revoked_certificate(arena: Arena) -> Finding:
    found, silence = Refusals(), Silence(hold_s=60.0)
    checked(cli("certs", "issue", "edge", "edge-r", "--certs-dir", str(arena.certs)))
    arena.register("edge-r")
    edge = arena.coordinator("edge-r")
    seen: dict = {}
    reader = threading.Thread(target=_ended, args=(edge.Connect(silence.stream(telemetry("edge-r")), timeout=60), seen))
    reader.start()
    try:
        deadline = time.monotonic() + RPC_S
        while "first" not in seen and "code" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        checked(cli("certs", "revoke", "edge", "edge-r", "--certs-dir", str(arena.certs)))
        written = time.monotonic()
        reader.join(REVOKED_BOUND_S + 10.0)
        ended = seen.get("at", float("inf")) - started
        found.measured = {"revoke_command_s": round(written - started, 2), "stream_ended_s": round(ended, 2)}
        found.check(
            "the open, bound stream",
            seen.get("code") == DENIED and ended <= REVOKED_BOUND_S,
            f"{getattr(seen.get('code'), 'name', 'still open')} {ended:.2f} s after `certs revoke` started",
        )
    finally:
        silence.end()
    status = code(lambda: edge.Register(coordinator_pb2.RegisterRequest(edge="edge-r"), timeout=RPC_S))
    found.check("Register afterwards", status == DENIED, status.name)
    listing = arena.portfolio("edge-r")
    status = code(lambda: listing.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=RPC_S))
    found.check("ListVariants afterwards", status == DENIED, status.name)
    return found.finding()


def two_agents_one_cache(arena: Arena) -> Finding:
    found = Refusals()
    first = arena.edge()
    started = time.monotonic()
    try:
        second = arena.start_edge("edge-b", arena.edge_cache, timeout_s=SECOND_AGENT_S)
    except processes.ProcessError as err:
        exit_code = re.search(r"exit code (-?\d+)", str(err))
        exited = exit_code is not None and int(exit_code.group(1)) > 0
        tail = str(err).splitlines()[-1][:200] if str(err).splitlines() else ""
        found.check(
            "a second agent on edge-c's cache",
            exited,
            f"exited with status {exit_code.group(1) if exit_code else '?'} after "
            f"{time.monotonic() - started:.1f} s: {tail}",
        )
    else:
        arena.stop(second)
        found.check("a second agent on edge-c's cache", False, "it started and served")
    as_client = arena.inference("app", first.address)
    status = code(lambda: as_client.Describe(inference_pb2.DescribeRequest(), timeout=RPC_S))
    parts = sorted(p.name for p in arena.edge_cache.glob("*.part"))
    found.check(
        "the first agent afterwards", status == grpc.StatusCode.OK and not parts, f"{status.name}, .part files: {parts}"
    )
    return found.finding()
