"""The link to the coordinator: Register, then one long-lived Connect stream; reconnect on loss.

Reports go up through an `Outbox`. Switch events are kept in a bounded buffer until a stream takes
them, so the coordinator learns of every switch made while it was unreachable (the oldest are
dropped past `max_buffered`). Telemetry and profiles are current state, not history: while the link
is down they are dropped, and every new stream starts with the profile of each variant held.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from edge.backoff import full_jitter
from protos import coordinator_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkConfig:
    edge: str
    address: str  # host:port of this agent's InferenceService
    metrics_address: str
    threads: int = 1
    rpc_timeout_s: float = 10.0  # Register's deadline; Connect is long-lived and has none
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_buffered: int = 1000  # switch events kept while disconnected
    max_live: int = 1000  # telemetry and profile reports queued on a live stream

    def __post_init__(self) -> None:
        if not self.edge or not self.address or self.threads < 1:
            raise ValueError("edge and address must be set and threads >= 1")
        if self.rpc_timeout_s <= 0 or not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("rpc_timeout_s must be positive and 0 <= backoff_s <= max_backoff_s")
        if self.max_buffered < 1 or self.max_live < 1:
            raise ValueError("max_buffered and max_live must be >= 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return full_jitter(attempt, self.backoff_s, self.max_backoff_s, rng)


RESEND_S = 10.0  # how far back a broken stream's events are sent again


class Outbox:
    """Reports waiting for the stream: switch events survive disconnection, the rest do not."""

    def __init__(self, max_buffered: int, max_live: int):
        self._ready = threading.Condition()
        self._events: deque = deque(maxlen=max_buffered)
        self._sent: deque = deque(maxlen=max_buffered)  # (monotonic time, event) given to the current stream
        self._live: deque = deque(maxlen=max_live)
        self._streams = 0  # open streams; a new one may start before the old one's generator has ended

    def event(self, report: coordinator_pb2.EdgeReport) -> None:
        with self._ready:
            self._events.append(report)
            self._ready.notify_all()

    def report(self, report: coordinator_pb2.EdgeReport) -> None:
        with self._ready:
            if self._streams:
                self._live.append(report)
                self._ready.notify_all()

    def pending_events(self) -> int:
        with self._ready:
            return len(self._events)

    def _next(self, alive: threading.Event):
        with self._ready:
            while alive.is_set():
                if self._events:
                    event = self._events.popleft()
                    self._sent.append((time.monotonic(), event))
                    return event
                if self._live:
                    return self._live.popleft()
                self._ready.wait(0.5)
        return None

    def stream(self, hello: list, alive: threading.Event) -> Iterator[coordinator_pb2.EdgeReport]:
        """What one Connect stream sends: `hello` first, then buffered events and live reports until
        `alive` clears."""
        with self._ready:
            self._streams += 1
        try:
            yield from hello
            while (report := self._next(alive)) is not None:
                yield report
        finally:
            with self._ready:
                self._streams = 0  # open streams; a new one may start before the old one's generator has ended
                self._live.clear()

    def close(self, alive: threading.Event) -> None:
        """End a stream. Events handed to it in its last RESEND_S seconds go back to the front of the
        buffer: a stream that breaks may have taken them without delivering them (at least once; the
        coordinator stores a repeated event once)."""
        with self._ready:
            alive.clear()
            recent = [event for at, event in self._sent if time.monotonic() - at <= RESEND_S]
            self._events.extendleft(reversed(recent))
            self._sent.clear()
            self._ready.notify_all()


class LinkHandler(Protocol):
    def registered(self, reply: coordinator_pb2.RegisterResponse) -> None: ...
    def directive(self, directive: coordinator_pb2.Directive) -> None: ...
    def hello(self) -> list[coordinator_pb2.EdgeReport]: ...


class Link:
    def __init__(self, config: LinkConfig, stub, outbox: Outbox, stopping: threading.Event,
                 rng: random.Random | None = None, sleep: Callable[[float], bool] | None = None):
        self.config, self._stub, self._outbox, self._stopping = config, stub, outbox, stopping
        self._rng = rng or random.Random()
        self._sleep = sleep or stopping.wait  # returns True once stopping: the wait ends early
        self._heard = threading.Event()  # the coordinator sent something on the current session

    def register(self) -> coordinator_pb2.RegisterResponse:
        request = coordinator_pb2.RegisterRequest(edge=self.config.edge, address=self.config.address,
                                                  metrics_address=self.config.metrics_address,
                                                  threads=self.config.threads)
        return self._stub.Register(request, timeout=self.config.rpc_timeout_s)

    def backoff(self, attempt: int) -> None:
        self._sleep(self.config.delay(attempt, self._rng))

    def session(self, handler: LinkHandler) -> None:
        """Register, then hold one Connect stream until it ends."""
        handler.registered(self.register())
        alive = threading.Event()
        alive.set()
        try:
            call = self._stub.Connect(self._outbox.stream(handler.hello(), alive))
            threading.Thread(target=self._cancel_on_stop, args=(call, alive), daemon=True, name="link-stop").start()
            for directive in call:
                self._heard.set()
                handler.directive(directive)
        finally:
            self._outbox.close(alive)

    def _cancel_on_stop(self, call, alive: threading.Event) -> None:
        while alive.is_set():
            if self._stopping.wait(0.25):
                call.cancel()
                return

    def run(self, handler: LinkHandler) -> None:
        """Keep a session up until `stopping` is set, backing off between attempts; the backoff starts
        over after a session in which the coordinator spoke."""
        attempt = 0
        while not self._stopping.is_set():
            self._heard.clear()
            try:
                self.session(handler)
                log.warning("link to the coordinator closed; reconnecting")
            except grpc.RpcError as err:
                if self._stopping.is_set():
                    return
                log.warning("link to the coordinator lost: %s %s", err.code().name, err.details())
            except Exception:  # never let the link die: the edge must keep reconnecting
                log.exception("link failed")
            attempt = 1 if self._heard.is_set() else attempt + 1
            self.backoff(attempt)
