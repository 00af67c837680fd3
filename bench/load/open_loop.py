"""Open-loop load for the policy benchmark: Poisson arrivals at a rate per phase, latency per request.

Requests are sent asynchronously (`Predict.future`), so a slow edge builds a queue instead of slowing
the sender down, as real traffic would. A request's latency runs from its scheduled send time to its
answer; a failed request records its status code.

The sender's own pauses count as the edge's (a request is timed from when it was due), so the
replay runs with Python's cyclic garbage collector off: the benchmark's process holds torch, the
dataset and the gRPC stack, so a full collection of it pauses the sender for far longer than an
inference takes, and the futures and outcomes a replay keeps would set collections off again and
again. With it on, those pauses dominate the sender's tail delay (measured; each outcome records
how late it went out, `send_lag_ms`).
"""

from __future__ import annotations

import gc
import random
import threading
import time
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float  # requests per second


@dataclass(frozen=True)
class Outcome:
    phase: str
    sent_at: float  # seconds since the trace started
    latency_ms: float
    variant_id: str  # "" when failed
    code: str
    send_lag_ms: float = 0.0  # how late the sender sent it (counted in latency_ms): the load generator's share


def replay(stub, request, phases: list[Phase], seed: int = 0, timeout_s: float = 10.0) -> list[Outcome]:
    """Send `request` along the trace; returns one outcome per request once all have ended."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _replay(stub, request, phases, seed, timeout_s)
    finally:
        if enabled:
            gc.enable()


def _replay(stub, request, phases: list[Phase], seed: int, timeout_s: float) -> list[Outcome]:
    rng, lock, outcomes, pending = random.Random(seed), threading.Lock(), [], []
    start = time.perf_counter()
    due = 0.0

    def record(phase: str, sent: float, lag_ms: float, future) -> None:
        latency = (time.perf_counter() - start - sent) * 1e3
        try:
            reply = future.result()
            outcome = Outcome(phase, sent, latency, reply.variant_id, "OK", lag_ms)
        except grpc.RpcError as err:
            outcome = Outcome(phase, sent, latency, "", err.code().name, lag_ms)
        with lock:
            outcomes.append(outcome)

    for phase in phases:
        end = due + phase.seconds
        while True:
            due += rng.expovariate(phase.rate)
            if due >= end:
                due = end
                break
            wait = due - (time.perf_counter() - start)
            if wait > 0:
                time.sleep(wait)
            lag_ms = max(0.0, time.perf_counter() - start - due) * 1e3
            future = stub.Predict.future(request, timeout=timeout_s)
            future.add_done_callback(lambda f, p=phase.name, s=due, lag=lag_ms: record(p, s, lag, f))
            pending.append(future)
    for future in pending:
        try:
            future.result(timeout=timeout_s + 5)
        except (grpc.RpcError, grpc.FutureTimeoutError):
            pass
    deadline = time.monotonic() + 5
    while len(outcomes) < len(pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    return sorted(outcomes, key=lambda o: o.sent_at)
