"""The agent: hold the portfolio (brought in by `edge.portfolio_sync`), serve, decide locally, report.

The decision loop closes a telemetry window every `window_s`, asks the policy what to serve and
switches locally. A queue that builds up within a window closes it early (`queue_alarm`), so a step
up in load is answered within about a tenth of a second rather than at the window's end. It never
waits for the coordinator: with the cloud unreachable the agent keeps serving and switching under its
last policy (the `Link` buffers the switch events meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import grpc

from common.errors import PrunefleetError
from common.files import portfolio_id, short_id
from common.security import Verifier
from edge import policy as policies
from edge.config import AgentConfig
from edge.link import Link, Outbox
from edge.metrics import EdgeMetrics
from edge.portfolio_sync import PortfolioSync
from edge.runtime import Runtime
from edge.server import set_serving
from edge.telemetry import ProcessStats, RequestWindow
from protos import coordinator_pb2

log = logging.getLogger(__name__)
STALE_WINDOWS = 3
POLL_S = 0.02  # how often the decision loop looks at the queue
MIN_WINDOW_S = 0.1  # a window closed early is at least this long, so it holds answered requests
RECENT_S = 0.2  # a window closed early takes its request rate from at least this last stretch of it


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        runtime: Runtime,
        metrics: EdgeMetrics,
        window: RequestWindow,
        process: ProcessStats,
        health,
        portfolio_stub,
        outbox: Outbox,
        stopping: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        verifier: Verifier | None = None,
    ):
        self.config, self.runtime, self.metrics = config, runtime, metrics
        self._window, self._process, self._health = window, process, health
        self._outbox, self.stopping = outbox, stopping
        self._clock, self._wall_clock = clock, wall_clock
        self._sync = PortfolioSync(config, runtime, metrics, portfolio_stub, outbox, stopping, verifier)
        self.policy = policies.PolicyConfig(
            slo_ms=config.slo_ms, window_s=config.window_s, memory_budget_bytes=config.memory_budget_bytes
        )
        self._state: policies.PolicyState | None = None
        self._decided_at: float | None = None
        self._arrived_at_open = window.arrived  # requests that had come when the policy window opened
        self._slot_s_at_open = 0.0  # the runtime's slot seconds then
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=256)  # (time, requests come so far)
        self._decide_lock = threading.Lock()  # the policy state and the switches that follow it

    def _report(self, **body) -> coordinator_pb2.EdgeReport:
        return coordinator_pb2.EdgeReport(edge=self.config.name, **body)

    # --- portfolio ---------------------------------------------------------------------------------
    def sync_portfolio(self, variants: Iterable) -> None:
        """Fetch, load and profile every variant not held yet (`PortfolioSync.sync`)."""
        self._sync.sync(variants)

    def adopt_portfolio(self, variants: list) -> None:
        """Load a new portfolio, move off the active variant if it left, and drop what left."""
        self.sync_portfolio(variants)
        wanted = {v.variant_id for v in variants}
        with self._decide_lock:
            if not any(o.variant_id in wanted for o in self.options()) or self.runtime.active is None:
                return  # nothing of the new portfolio could be loaded: keep serving the old one
            leaving = set(self.runtime.variants()) - wanted
            self._sync.forget_profiles(leaving)
            if self.runtime.active.variant_id in leaving:
                choice = policies.initial_choice(self.policy, self.options())
                self._apply(self._chosen(choice, f"portfolio changed; {choice.label} fits best", "portfolio"))
            self._sync.drop(leaving)

    def options(self) -> list[policies.Option]:
        known, profiles = self.runtime.variants(), self._sync.profiles
        return [
            policies.Option(
                vid, known[vid].accuracy, p.batch.p50_ms, p.batch.p95_ms, known[vid].name, known[vid].size_bytes
            )
            for vid, p in profiles.items()
            if vid in known
        ]

    def profile_reports(self) -> list[coordinator_pb2.EdgeReport]:
        return [self._report(profile=p.to_proto()) for p in self._sync.profiles.values()]

    def set_policy(self, policy: coordinator_pb2.Policy) -> None:
        try:
            self.policy = policies.PolicyConfig.from_proto(
                policy, window_s=self.config.window_s, memory_budget_bytes=self.config.memory_budget_bytes
            )
        except ValueError as err:
            log.error("policy v%d refused, keeping v%d: %s", policy.version, self.policy.version, err)
            return
        self.metrics.slo(self.policy.slo_ms / 1e3)
        log.info(
            "policy v%d: SLO p95 <= %.1f ms, pinned %s",
            self.policy.version,
            self.policy.slo_ms,
            short_id(self.policy.pinned_variant) or "none",
        )

    # --- the coordinator's side of the link (edge.link.LinkHandler) ------------------------------
    def registered(self, reply: coordinator_pb2.RegisterResponse) -> None:
        self.set_policy(reply.policy)
        changed = {v.variant_id for v in reply.variants} != set(self.runtime.variants())
        if changed and not self._sync.busy():  # a load in progress gets its turn first
            self._in_background(self.adopt_portfolio, list(reply.variants))

    def directive(self, directive: coordinator_pb2.Directive) -> None:
        kind = directive.WhichOneof("body")
        if kind == "policy":
            self.set_policy(directive.policy)
        elif kind == "portfolio":
            self._in_background(self.adopt_portfolio, list(directive.portfolio.variants))

    def hello(self) -> list[coordinator_pb2.EdgeReport]:
        return self.profile_reports()

    def _in_background(self, work: Callable, *args) -> None:
        threading.Thread(target=work, args=args, daemon=True, name="portfolio").start()

    # --- decisions ---------------------------------------------------------------------------------
    def _chosen(self, choice: policies.Option, reason: str, reason_code: str) -> policies.Decision:
        """A switch the agent decides outside the policy's window loop (start-up, portfolio change)."""
        state = policies.PolicyState(choice.variant_id, last_switch_at=self._clock())
        return policies.Decision(
            choice.variant_id, reason, reason_code, state, switch=True, predicted_p95_ms=choice.p95_ms
        )

    def _apply(self, decision: policies.Decision, window: policies.Window | None = None) -> None:
        """Carry out a recorded decision (the caller holds the decision lock): switch if it says so (an
        on-demand load included), then count, log and report it with its inputs. The policy state moves
        on only once the switch happened."""
        active = self.runtime.active.variant_id if self.runtime.active else ""
        record = None
        if decision.switch:
            record = self.runtime.switch(decision.target, decision.reason)
            self.metrics.switched(
                decision.reason_code, record.switch_us / 1e6, self.runtime.variants(), decision.target
            )
            if record.load_s:
                self.metrics.loaded(decision.target, record.load_s, self.runtime.resident_bytes(), "on_demand")
            self._sync.memory_changed(record.evicted)
        self._state = decision.state
        load_ms = record.load_s * 1e3 if record else 0.0
        log.info(
            "%s %s -> %s in %.1f us%s: %s",
            "switch" if record else "decision",
            short_id(active) or "-",
            short_id(decision.target),
            record.switch_us if record else 0.0,
            f" after a {load_ms:.1f} ms load" if load_ms else "",
            decision.reason,
        )
        self._outbox.event(
            self._report(
                switch=coordinator_pb2.SwitchEvent(
                    timestamp=self._wall_clock(),
                    from_variant=record.from_variant if record else active,
                    to_variant=decision.target,
                    reason=decision.reason,
                    reason_code=decision.reason_code,
                    observed_p95_ms=window.p95_ms if window else 0.0,
                    switch_us=record.switch_us if record else 0.0,
                    request_rate=window.rate if window else 0.0,
                    window_requests=window.requests if window else 0,
                    predicted_p95_ms=decision.predicted_p95_ms,
                    slo_ms=self.policy.slo_ms,
                    policy_version=self.policy.version,
                    load_ms=load_ms,
                    switched=record is not None,
                    telemetry_missing=window is None and decision.reason_code == "fallback",
                )
            )
        )

    def start_serving(self) -> None:
        """Close the start-up window, activate the initial choice and report SERVING."""
        self._startup_window()
        with self._decide_lock:
            choice = policies.initial_choice(self.policy, self.options())
            self._apply(
                self._chosen(
                    choice,
                    f"initial choice: {choice.label}, profiled p95 {choice.p95_ms:.1f} ms "
                    f"at batch {self.config.batch} (SLO {self.policy.slo_ms:.1f} ms)",
                    "initial",
                )
            )
        set_serving(self._health, True)

    def _startup_window(self) -> None:
        """Requests that came while nothing was active (refused UNAVAILABLE) say nothing about the portfolio
        held: their window is reported, but under no portfolio, so a rollout judging this edge as a
        canary (restarted mid-rollout, say) never counts them against the new portfolio."""
        stats = self._window.close_window(self._clock())
        if stats.requests:
            telemetry = self._telemetry(stats, *self._process.sample())
            telemetry.portfolio_id = ""
            self._outbox.telemetry(self._report(telemetry=telemetry))

    def _telemetry(self, stats, cpu: float, rss: int) -> coordinator_pb2.Telemetry:
        active = self.runtime.active
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
            resident_variants=len(self.runtime.resident()),
            portfolio_id=portfolio_id(self.runtime.variants()),
            policy_version=self.policy.version,
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

    def _policy_window(self, now: float, early: bool = False) -> policies.Window | None:
        """Close the telemetry window and report it (kept while the cloud is away). None when telemetry
        is missing: the window could not be read, it is stale (the decision loop was held up for over
        `STALE_WINDOWS` windows), or requests came and none was answered (no latency to go by). The
        rate the policy sees counts the requests that came in the window, as gRPC handed them over
        (answered, failed, or still waiting for a worker thread or a slot): under overload, answers
        come at the active variant's capacity whatever the load. A window closed `early` (by a queue
        alarm: the load has just risen) takes the rate of its last `RECENT_S` if that is higher, since
        its average mixes the new load with the calm before it and would have the policy step down too
        little, then again. The process's CPU time over the window, per answered request, and the wall
        time each held a slot (waits for the CPU and for Python's lock included) tell the policy what a
        request costs beyond the model's forward pass."""
        try:
            stats = self._window.close_window(now)
            in_flight, arrived, arrived_at_open = self.runtime.in_flight, self._window.arrived, self._arrived_at_open
            slot_s, slot_s_at_open = self.runtime.slot_seconds, self._slot_s_at_open
            self._arrived_at_open, self._slot_s_at_open = arrived, slot_s
            cpu, rss = self._process.sample()
            device_busy = self._process.device_busy()
            self._outbox.telemetry(self._report(telemetry=self._telemetry(stats, cpu, rss)))
        except Exception:
            log.exception("telemetry window unreadable")
            return None
        recent = self.recent_rate(now, now - stats.seconds - 1e-9) if early else 0.0
        self.note_arrivals(now)
        stale = self._decided_at is not None and now - self._decided_at > STALE_WINDOWS * self.policy.window_s
        answered = stats.requests - stats.errors
        if stale or (stats.requests and not answered):
            return None
        cpu_ms = cpu * 10.0 * stats.seconds / answered if answered else 0.0  # percent of a core -> ms
        slot_ms = (slot_s - slot_s_at_open) * 1e3 / answered if answered else 0.0
        rate = max((arrived - arrived_at_open) / stats.seconds, recent)
        return policies.Window(
            answered,
            stats.p95_ms,
            rate,
            self.runtime.config.slots,
            cpu_ms,
            in_flight,
            device_busy,
            self._process.cores,
            slot_ms,
        )

    def decide_once(self, early: bool = False) -> policies.Decision | None:
        """Close the window (`early`: before its time, on a queue alarm), report it, and switch if the
        policy says so."""
        window = self._policy_window(self._clock(), early)
        with self._decide_lock:
            if self._state is None:
                return None
            now = self._clock()
            decision = policies.decide(self.policy, self.options(), self._state, window, now)
            if decision.recorded:
                try:
                    self._apply(decision, window)
                except (PrunefleetError, OSError, RuntimeError, ValueError) as err:
                    log.error(
                        "switch to %s failed, staying on %s: %s",
                        short_id(decision.target),
                        short_id(self.runtime.active.variant_id),
                        err,
                    )
            else:
                self._state = decision.state
            self._decided_at = self._clock()
        return decision

    def queue_alarm(self, window_age_s: float) -> bool:
        """The inferences in flight would take the active variant the policy's share of the SLO to serve
        (`policies.queued`, at the profiled p50 alone: the window's overhead is not measured yet): the
        load has risen past what it serves, and the policy should see the window now (it is at least
        MIN_WINDOW_S old) rather than at its end."""
        in_flight = self.runtime.in_flight
        if window_age_s < MIN_WINDOW_S or in_flight <= self.runtime.config.slots or self._state is None:
            return False
        active = next((o for o in self.options() if o.variant_id == self._state.active), None)
        so_far = policies.Window(0, 0.0, slots=self.runtime.config.slots, in_flight=in_flight)
        return active is not None and policies.queued(self.policy, active, so_far)

    def decision_loop(self) -> None:
        """Decide every `window_s`, or early on a queue alarm (never twice in a row early, so a queue
        still draining after a step down gets a whole window to show its effect)."""
        opened, early = self._clock(), False
        while not self.stopping.wait(POLL_S):
            now = self._clock()
            self.note_arrivals(now)
            due = now - opened >= self.policy.window_s
            if not due and (early or not self.queue_alarm(now - opened)):
                continue
            opened, early = now, not due
            try:
                self.decide_once(early)
            except Exception:  # a bad window must not end the loop that keeps the edge within its SLO
                log.exception("decision failed; keeping the active variant")


def initial_portfolio(agent: Agent, link: Link) -> bool:
    """Register (retrying with backoff) and load the portfolio the coordinator names, until at least
    one variant is ready. False if the agent was stopped first."""
    attempt = 0
    while not agent.stopping.is_set():
        try:
            reply = link.register()
            agent.set_policy(reply.policy)
            agent.sync_portfolio(reply.variants)
            if agent.options():
                return True
            log.warning("no usable variant in portfolio %r yet", reply.portfolio_id)
        except grpc.RpcError as err:
            log.warning("cannot register with %s: %s %s", agent.config.cloud, err.code().name, err.details())
        attempt += 1
        link.backoff(attempt)
    return False
