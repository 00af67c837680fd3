"""The agent: hold the portfolio (brought in by `edge.portfolio_sync`), serve, decide locally, report.

The decision loop closes a telemetry window every `window_s`, asks the policy what to serve and
switches locally. A queue that builds up within a window closes it early (`queue_alarm`), so a step
up in load is answered after `MIN_WINDOW_S` rather than at the window's end. It never waits for the
coordinator: with the cloud unreachable the agent keeps serving and switching under its last policy
(the `Link` buffers the switch events meanwhile). Every decision carries a `ReasonCode` of the policy
contract (`common.policy_contract`), which the events and the switch counter report as its string.
Every listing given goes through its `ListingGuard` (`edge.listing_guard`) first: a refused one changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from common.errors import PrunefleetError
from common.files import short_id
from common.policy_contract import ReasonCode
from common.security import Verifier
from edge import policy as policies
from edge.backends.base import Backend
from edge.config import AgentConfig
from edge.link import Link, Outbox
from edge.listing_guard import ListingGuard, registered_listing
from edge.metrics import EdgeMetrics
from edge.portfolio_sync import PortfolioSync
from edge.runtime import Runtime
from edge.server import set_serving
from edge.telemetry import ProcessStats, RequestWindow
from edge.windows import MIN_WINDOW_S, PolicyWindows
from protos import coordinator_pb2

log = logging.getLogger(__name__)
STALE_WINDOWS = 3
POLL_S = 0.02  # how often the decision loop looks at the queue


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
        backend: Backend | None = None,
        listings: ListingGuard | None = None,
    ):
        self.config, self.runtime, self.metrics, self._health = config, runtime, metrics, health
        self._outbox, self.stopping, self._clock, self._wall_clock = outbox, stopping, clock, wall_clock
        self.listings = listings or ListingGuard(verifier, config.cache_dir, wall_clock=wall_clock)
        self._sync = PortfolioSync(config, runtime, metrics, portfolio_stub, outbox, stopping, verifier, backend)
        self.policy = policies.PolicyConfig(
            slo_ms=config.slo_ms, window_s=config.window_s, memory_budget_bytes=config.memory_budget_bytes
        )
        self._state, self._decided_at = None, None  # policy state; when the loop last decided
        self.windows = PolicyWindows(
            window,
            process,
            runtime,
            lambda telemetry: outbox.telemetry(self._report(telemetry=telemetry)),
            lambda: self.policy.version,
            wall_clock,
            self._sync.held_portfolio,
        )
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
                self._apply(self._chosen(choice, f"portfolio changed; {choice.label} fits best", ReasonCode.PORTFOLIO))
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
        if not self.listings.admit(listing := registered_listing(reply)):
            return
        changed = self._sync.servable(listing.variants) != set(self.runtime.variants())
        if changed and not self._sync.busy():  # a load in progress gets its turn first
            self._in_background(self.adopt_portfolio, list(listing.variants))

    def directive(self, directive: coordinator_pb2.Directive) -> None:
        kind = directive.WhichOneof("body")
        if kind == "policy":
            self.set_policy(directive.policy)
        elif kind == "portfolio" and self.listings.admit(directive.portfolio):
            self._in_background(self.adopt_portfolio, list(directive.portfolio.variants))

    def hello(self) -> list[coordinator_pb2.EdgeReport]:
        return self.profile_reports()

    def _in_background(self, work: Callable, *args) -> None:
        threading.Thread(target=work, args=args, daemon=True, name="portfolio").start()

    # --- decisions ---------------------------------------------------------------------------------
    def _chosen(self, choice: policies.Option, reason: str, reason_code: ReasonCode) -> policies.Decision:
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
                    telemetry_missing=window is None and decision.reason_code == ReasonCode.FALLBACK,
                )
            )
        )

    def start_serving(self) -> None:
        """Close the start-up window, activate the initial choice and report SERVING."""
        self.windows.startup(self._clock())
        with self._decide_lock:
            choice = policies.initial_choice(self.policy, self.options())
            self._apply(
                self._chosen(
                    choice,
                    f"initial choice: {choice.label}, profiled p95 {choice.p95_ms:.1f} ms "
                    f"at batch {self.config.batch} (SLO {self.policy.slo_ms:.1f} ms)",
                    ReasonCode.INITIAL,
                )
            )
        set_serving(self._health, True)

    def _policy_window(self, now: float, early: bool = False) -> policies.Window | None:
        """Close the telemetry window and report it (`edge.windows`). None when telemetry is missing,
        or stale: the decision loop was held up for over `STALE_WINDOWS` windows."""
        window = self.windows.close(now, early)
        stale = self._decided_at is not None and now - self._decided_at > STALE_WINDOWS * self.policy.window_s
        return None if stale else window

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
            self.windows.note_arrivals(now)
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
            if agent.listings.admit(listing := registered_listing(reply)):
                agent.sync_portfolio(listing.variants)
            if agent.options():
                return True
            log.warning("no usable variant in portfolio %r yet", listing.portfolio_id)
        except grpc.RpcError as err:
            log.warning("cannot register with %s: %s %s", agent.config.cloud, err.code().name, err.details())
        attempt += 1
        link.backoff(attempt)
    return False
