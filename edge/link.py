"""The link to the coordinator: Register, then one long-lived Connect stream; reconnect on loss.

Reports go up through an `Outbox`. Switch events and telemetry windows are kept in bounded buffers
until a stream takes them, so the coordinator learns of every switch and window while it was
unreachable (the oldest are dropped past `max_buffered` events and `max_telemetry` windows); both are
sent at least once and the coordinator stores a repeat once. Profiles are current state: while the
link is down they are dropped, and every new stream starts with the profile of each variant held.
The Connect stream has a deadline too (`stream_deadline_s`); the link then simply opens a new one.
The coordinator heartbeats on an idle stream; one silent for `silence_s` is given up, and what it
took since shortly before the coordinator was last heard is sent again on the next.

Every report is made to fit the bounds the coordinator checks (`common.edge_input`: texts escaped and
cut, numbers clamped) before it is queued, and one that still would not pass is logged, counted in
`Outbox.refused` and never sent: the coordinator ends a stream that carries a report it refuses, and
a buffered one would be sent again on every new stream.
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

from common.edge_input import fitted, report_problem
from edge.backoff import full_jitter
from protos import coordinator_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkConfig:
    edge: str
    address: str  # host:port of this agent's InferenceService
    metrics_address: str
    threads: int = 1
    rpc_timeout_s: float = 10.0  # Register's deadline
    stream_deadline_s: float = 3600.0  # Connect's: a long-lived stream is renewed this often
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_buffered: int = 1000  # switch events kept while disconnected
    max_telemetry: int = 3600  # telemetry windows kept while disconnected (an hour of 1 s windows)
    max_live: int = 1000  # profile reports queued on a live stream
    silence_s: float = 20.0  # a stream the coordinator said nothing on for this long (it heartbeats) is given up

    def __post_init__(self) -> None:
        if not self.edge or not self.address or self.threads < 1:
            raise ValueError("edge and address must be set and threads >= 1")
        if self.rpc_timeout_s <= 0 or not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("rpc_timeout_s must be positive and 0 <= backoff_s <= max_backoff_s")
        if self.max_buffered < 1 or self.max_live < 1 or self.max_telemetry < 1:
            raise ValueError("max_buffered, max_telemetry and max_live must be >= 1")
        if self.stream_deadline_s <= self.rpc_timeout_s:
            raise ValueError("stream_deadline_s must be longer than rpc_timeout_s")
        if self.silence_s <= 0:
            raise ValueError("silence_s must be positive")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return full_jitter(attempt, self.backoff_s, self.max_backoff_s, rng)


RESEND_S = 10.0  # how far back, from the last word of the coordinator, a broken stream's reports are sent again


class Outbox:
    """Reports waiting for the stream: switch events and telemetry survive disconnection, profiles do not."""

    def __init__(self, max_buffered: int, max_live: int, max_telemetry: int = 3600):
        self._ready = threading.Condition()
        self._events: deque = deque(maxlen=max_buffered)
        self._telemetry: deque = deque(maxlen=max_telemetry)
        self._sent: deque = deque(maxlen=max_buffered + max_telemetry)  # (monotonic time, queue, report)
        self._live: deque = deque(maxlen=max_live)
        self._streams = 0  # open streams; a new one may start before the old one's generator has ended
        self.refused = 0  # reports that could not be made to fit the coordinator's bounds, never sent

    def _fit(self, report: coordinator_pb2.EdgeReport) -> coordinator_pb2.EdgeReport | None:
        """The report as the coordinator accepts it, or None (logged and counted) when it cannot be."""
        report = fitted(report)
        problem = report_problem(report)
        if problem is None:
            return report
        self.refused += 1
        log.error("report not sent: the coordinator would refuse it: %s", problem)
        return None

    def event(self, report: coordinator_pb2.EdgeReport) -> None:
        if (report := self._fit(report)) is not None:
            with self._ready:
                self._events.append(report)
                self._ready.notify_all()

    def telemetry(self, report: coordinator_pb2.EdgeReport) -> None:
        if (report := self._fit(report)) is not None:
            with self._ready:
                self._telemetry.append(report)
                self._ready.notify_all()

    def report(self, report: coordinator_pb2.EdgeReport) -> None:
        if (report := self._fit(report)) is None:
            return
        with self._ready:
            if self._streams:
                self._live.append(report)
                self._ready.notify_all()

    def pending_events(self) -> int:
        with self._ready:
            return len(self._events)

    def pending_telemetry(self) -> int:
        with self._ready:
            return len(self._telemetry)

    def _next(self, alive: threading.Event):
        with self._ready:
            while alive.is_set():
                for kept in (self._events, self._telemetry):
                    if kept:
                        report = kept.popleft()
                        self._sent.append((time.monotonic(), kept, report))
                        return report
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
            yield from (fit for report in hello if (fit := self._fit(report)) is not None)
            while (report := self._next(alive)) is not None:
                yield report
        finally:
            with self._ready:
                self._streams = 0  # open streams; a new one may start before the old one's generator has ended
                self._live.clear()

    def close(self, alive: threading.Event, heard_at: float | None = None) -> None:
        """End a stream. Events and windows handed to it since RESEND_S seconds before the coordinator
        was last heard on it (`heard_at`, monotonic; default now) go back to the front of their buffers:
        a stream that breaks may have taken them without delivering them, and one whose link went
        silent took everything since without a word back (at least once; the coordinator stores a
        repeat once)."""
        with self._ready:
            alive.clear()
            since = min(time.monotonic(), heard_at if heard_at is not None else time.monotonic()) - RESEND_S
            for kept in (self._events, self._telemetry):
                recent = [report for at, queue, report in self._sent if queue is kept and at >= since]
                kept.extendleft(reversed(recent))
            self._sent.clear()
            self._ready.notify_all()


class LinkHandler(Protocol):
    def registered(self, reply: coordinator_pb2.RegisterResponse) -> None: ...
    def directive(self, directive: coordinator_pb2.Directive) -> None: ...
    def hello(self) -> list[coordinator_pb2.EdgeReport]: ...


class Link:
    def __init__(
        self,
        config: LinkConfig,
        stub,
        outbox: Outbox,
        stopping: threading.Event,
        rng: random.Random | None = None,
        sleep: Callable[[float], bool] | None = None,
    ):
        self.config, self._stub, self._outbox, self._stopping = config, stub, outbox, stopping
        self._rng = rng or random.Random()
        self._sleep = sleep or stopping.wait  # returns True once stopping: the wait ends early
        self._heard = threading.Event()  # the coordinator sent something on the current session
        self._heard_at = time.monotonic()  # when it last did (a reply to Register counts)

    def register(self) -> coordinator_pb2.RegisterResponse:
        request = coordinator_pb2.RegisterRequest(
            edge=self.config.edge,
            address=self.config.address,
            metrics_address=self.config.metrics_address,
            threads=self.config.threads,
        )
        return self._stub.Register(request, timeout=self.config.rpc_timeout_s)

    def backoff(self, attempt: int) -> None:
        self._sleep(self.config.delay(attempt, self._rng))

    def session(self, handler: LinkHandler) -> None:
        """Register, then hold one Connect stream until it ends."""
        handler.registered(self.register())
        self._heard_at = time.monotonic()
        alive = threading.Event()
        alive.set()
        try:
            call = self._stub.Connect(
                self._outbox.stream(handler.hello(), alive), timeout=self.config.stream_deadline_s
            )
            threading.Thread(target=self._watch, args=(call, alive), daemon=True, name="link-watch").start()
            for directive in call:
                self._heard.set()
                self._heard_at = time.monotonic()
                if directive.WhichOneof("body"):  # an empty one is the coordinator's heartbeat
                    handler.directive(directive)
        finally:
            self._outbox.close(alive, self._heard_at)

    def _watch(self, call, alive: threading.Event) -> None:
        """Cancel the stream when the agent stops, or when the coordinator has said nothing on it for
        `silence_s`: a link that died without a reset (a cut cable, a dropped route) is noticed then,
        not whenever TCP or gRPC keepalive gives up."""
        while alive.is_set():
            if self._stopping.wait(0.25):
                call.cancel()
                return
            if time.monotonic() - self._heard_at > self.config.silence_s:
                log.warning("no word from the coordinator for %.0f s; reconnecting", self.config.silence_s)
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
                # CANCELLED is this edge's own doing (silence, or a channel closed for a renewed certificate)
                level = logging.INFO if err.code() == grpc.StatusCode.CANCELLED else logging.WARNING
                log.log(level, "link to the coordinator lost: %s %s", err.code().name, err.details())
            except Exception:  # never let the link die: the edge must keep reconnecting
                log.exception("link failed")
            attempt = 1 if self._heard.is_set() else attempt + 1
            self.backoff(attempt)
