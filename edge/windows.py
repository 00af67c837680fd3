"""The agent's telemetry windows: what each reports up, and what the policy reads from it.

Each window is reported to the coordinator (kept while the cloud is away) and turned into the
policy's `Window`. The rate the policy sees counts the requests that came in the window, as gRPC
handed them over (answered, failed, or still waiting for a worker thread or a slot): under overload,
answers come at the active variant's capacity whatever the load. A window closed `early` (by a queue
alarm: the load has just risen) takes the rate of its last `RECENT_S` if that is higher, since its
average mixes the new load with the calm before it and would have the policy step down too little,
then again. The process's CPU time over the window, per answered request, and the wall time each
held a slot (waits for the CPU and for Python's lock included) tell the policy what a request costs
beyond the model's forward pass.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from common.files import portfolio_id
from edge import policy as policies
from edge.runtime import Runtime
from edge.telemetry import ProcessStats, RequestWindow
from protos import coordinator_pb2

log = logging.getLogger(__name__)
MIN_WINDOW_S = 0.1  # a window closed early is at least this long, so it holds answered requests
RECENT_S = 0.2  # a window closed early takes its request rate from at least this last stretch of it


class PolicyWindows:
    """Closes telemetry windows: sends each up (`send`) and returns the policy's view of it."""

    def __init__(
        self,
        window: RequestWindow,
        process: ProcessStats,
        runtime: Runtime,
        send: Callable[[coordinator_pb2.Telemetry], None],
        policy_version: Callable[[], int],
        wall_clock: Callable[[], float],
        held_portfolio: Callable[[], str] | None = None,
    ):
        """`held_portfolio`: the id of the portfolio held, as reported (default: the hash of the ids
        of the variants the runtime holds; the agent's is `PortfolioSync.held_portfolio`)."""
        self._window, self._process, self._runtime = window, process, runtime
        self._send, self._policy_version, self._wall_clock = send, policy_version, wall_clock
        self._held_portfolio = held_portfolio or (lambda: portfolio_id(runtime.variants()))
        self._arrived_at_open = window.arrived  # requests that had come when the policy window opened
        self._slot_s_at_open = 0.0  # the runtime's slot seconds then
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=256)  # (time, requests come so far)

    def startup(self, now: float) -> None:
        """Requests that came while nothing was active (refused UNAVAILABLE) say nothing about the
        portfolio held: their window is reported, but under no portfolio, so a rollout judging this edge
        as a canary (restarted mid-rollout, say) never counts them against the new portfolio."""
        stats = self._window.close_window(now)
        if stats.requests:
            telemetry = self.telemetry(stats, *self._process.sample())
            telemetry.portfolio_id = ""
            self._send(telemetry)

    def telemetry(self, stats, cpu: float, rss: int) -> coordinator_pb2.Telemetry:
        active = self._runtime.active
        return coordinator_pb2.Telemetry(
            timestamp=self._wall_clock(),
            active_variant=active.variant_id if active else "",
            request_rate=stats.rate,
            p50_ms=stats.p50_ms,
            p95_ms=stats.p95_ms,
            p99_ms=stats.p99_ms,
            requests=stats.requests,
            errors=stats.errors,
            cpu_percent=cpu,
            rss_bytes=rss,
            resident_variants=len(self._runtime.resident()),
            portfolio_id=self._held_portfolio(),
            policy_version=self._policy_version(),
        )

    def note_arrivals(self, now: float) -> None:
        """Sample the running count of requests that came (the decision loop does, every poll)."""
        self._arrivals.append((now, self._window.arrived))

    def recent_rate(self, now: float, since: float, span_s: float = RECENT_S) -> float:
        """Requests per second that came over about the last `span_s` before `now`, from the newest
        sample (`note_arrivals`) at least that old and taken at or after `since` (the window's opening),
        else from the window's oldest one; 0 when the stretch is too short to measure."""
        samples = [(t, n) for t, n in self._arrivals if since <= t < now]
        if not samples:
            return 0.0
        then, count = next(((t, n) for t, n in reversed(samples) if now - t >= span_s - 1e-6), samples[0])
        if now - then < MIN_WINDOW_S / 2:
            return 0.0
        return (self._window.arrived - count) / (now - then)

    def close(self, now: float, early: bool = False) -> policies.Window | None:
        """Close the window and report it. None when telemetry is missing: the window could not be
        read, or requests came and none was answered (no latency to go by)."""
        try:
            stats = self._window.close_window(now)
            in_flight, arrived, arrived_at_open = self._runtime.in_flight, self._window.arrived, self._arrived_at_open
            slot_s, slot_s_at_open = self._runtime.slot_seconds, self._slot_s_at_open
            self._arrived_at_open, self._slot_s_at_open = arrived, slot_s
            cpu, rss = self._process.sample()
            device_busy = self._process.device_busy()
            self._send(self.telemetry(stats, cpu, rss))
        except Exception:
            log.exception("telemetry window unreadable")
            return None
        recent = self.recent_rate(now, now - stats.seconds - 1e-9) if early else 0.0
        self.note_arrivals(now)
        answered = stats.requests - stats.errors
        if stats.requests and not answered:
            return None
        cpu_ms = cpu * 10.0 * stats.seconds / answered if answered else 0.0  # percent of a core -> ms
        slot_ms = (slot_s - slot_s_at_open) * 1e3 / answered if answered else 0.0
        rate = max((arrived - arrived_at_open) / stats.seconds, recent)
        return policies.Window(
            answered,
            stats.p95_ms,
            rate,
            self._runtime.config.slots,
            cpu_ms,
            in_flight,
            device_busy,
            self._process.cores,
            slot_ms,
        )
