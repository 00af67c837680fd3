"""The agent: load and profile the portfolio here, serve, decide locally, report.

The decision loop closes a telemetry window every `window_s`, asks the policy what to serve and
switches locally. It never waits for the coordinator: with the cloud unreachable the agent keeps
serving and switching under its last policy (the `Link` buffers the switch events meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import variant
from common.files import portfolio_id
from common.security import SecurityError, Verifier
from edge import policy as policies
from edge.fetcher import FetchError, RetryConfig, fetch
from edge.link import Link, Outbox
from edge.metrics import EdgeMetrics
from edge.loading import Profile, budget_groups, cache_loader, variant_info
from edge.profiler import profile_interleaved
from edge.runtime import LoadedVariant, Runtime, UnknownVariantError
from edge.server import set_serving
from edge.telemetry import ProcessStats, RequestWindow
from protos import coordinator_pb2

log = logging.getLogger(__name__)
STALE_WINDOWS = 3


@dataclass(frozen=True)
class AgentConfig:
    cloud: str  # host:port of the coordinator and portfolio service
    name: str
    cache_dir: Path
    host: str = "127.0.0.1"  # address to bind
    advertise_host: str = ""  # how the coordinator and clients reach this edge; defaults to `host`
    port: int = 0  # 0 picks a free port
    metrics_port: int = 0
    threads: int = 1  # inference threads, and concurrent inferences
    batch: int = 8  # the typical batch, profiled on arrival
    max_batch: int = 256
    window_s: float = 1.0  # telemetry window until the policy sets one
    workers: int = 16  # gRPC server threads
    profile_iters: int = 30
    fetch_deadline_s: float = 300.0
    fetch_attempts: int = 5
    slo_ms: float = 50.0  # where the latency histogram gets its SLO bucket; the policy sets the real SLO
    backoff_s: float = 0.5  # reconnect and re-register: exponential backoff with full jitter from here
    max_backoff_s: float = 10.0
    allowed_models: tuple[str, ...] = ()  # import-path architectures this edge may build (zoo: always)
    verify_key: Path | None = None  # the cloud's Ed25519 public key: refuse unsigned or wrongly signed variants
    memory_budget_mib: float = 0.0  # resident model bytes; the rest load on demand (0 = hold all)
    batch_delay_ms: float = 0.0  # micro-batching: longest a request waits for others (0 = off)
    max_pending: int = 256  # Predicts in progress or queued; beyond, RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if not self.cloud or not self.name:
            raise ValueError("cloud and name must be set")
        if self.threads < 1 or self.workers < 2 or self.profile_iters < 1 or self.fetch_attempts < 1:
            raise ValueError("threads and fetch_attempts must be >= 1, workers >= 2 and profile_iters >= 1")
        if not 1 <= self.batch <= self.max_batch:
            raise ValueError(f"batch must be in [1, max_batch={self.max_batch}]")
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError("ports must be in [0, 65535]")
        if self.window_s <= 0 or self.fetch_deadline_s <= 0 or self.slo_ms <= 0:
            raise ValueError("window_s, fetch_deadline_s and slo_ms must be positive")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError("backoff_s must be in [0, max_backoff_s]")
        if self.memory_budget_mib < 0 or not 0 <= self.batch_delay_ms <= 1000 or self.max_pending < 1:
            raise ValueError("memory_budget_mib must be >= 0, batch_delay_ms in [0, 1000], max_pending >= 1")

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mib * (1 << 20))

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host


class Agent:
    def __init__(self, config: AgentConfig, runtime: Runtime, metrics: EdgeMetrics, window: RequestWindow,
                 process: ProcessStats, health, portfolio_stub, outbox: Outbox, stopping: threading.Event,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 verifier: Verifier | None = None):
        self.config, self.runtime, self.metrics = config, runtime, metrics
        self._verifier = verifier
        self._window, self._process, self._health = window, process, health
        self._portfolio, self._outbox, self.stopping = portfolio_stub, outbox, stopping
        self._clock, self._wall_clock = clock, wall_clock
        self.policy = policies.PolicyConfig(slo_ms=config.slo_ms, window_s=config.window_s,
                                            memory_budget_bytes=config.memory_budget_bytes)
        self._state: policies.PolicyState | None = None
        self._decided_at: float | None = None
        self._profiles: dict[str, Profile] = {}
        self._load_lock = threading.Lock()  # one portfolio change at a time
        self._decide_lock = threading.Lock()  # the policy state and the switches that follow it

    def _report(self, **body) -> coordinator_pb2.EdgeReport:
        return coordinator_pb2.EdgeReport(edge=self.config.name, **body)

    # --- portfolio ---------------------------------------------------------------------------------
    def _fetch(self, info) -> tuple[Path, float]:
        """Check the cloud's signature (when this edge has its key), then fetch and verify (sha256 =
        variant id) one variant into the cache; the seconds it took."""
        start = time.perf_counter()
        if self._verifier is not None:
            self._verifier.check(info.variant_id, info.signature)  # before a byte is downloaded
        path = fetch(self._portfolio, info.variant_id, self.config.cache_dir, self.config.fetch_deadline_s,
                     retry=RetryConfig(attempts=self.config.fetch_attempts, backoff_s=self.config.backoff_s,
                                       max_backoff_s=self.config.max_backoff_s))
        return path, time.perf_counter() - start

    def _loader(self, info, path: Path) -> Callable[[], LoadedVariant]:
        return cache_loader(variant_info(info), path, self.config.allowed_models)

    def _profile_and_hold(self, fresh: list[tuple]) -> None:
        """Warm up and profile the new variants here (interleaved), then hold and announce them."""
        models = {ready.variant_id: (ready.model, ready.spec.input_shape) for _, ready, _, _ in fresh}
        iters = self.config.profile_iters
        b1 = profile_interleaved(models, 1, iters)
        typical = profile_interleaved(models, self.config.batch, iters)
        for info, ready, load_s, loader in fresh:
            profile = Profile(info.variant_id, b1[info.variant_id], typical[info.variant_id])
            self._profiles = {**self._profiles, info.variant_id: profile}
            evicted = self.runtime.add(ready, loader)
            self.metrics.loaded(info.variant_id, load_s, self.runtime.resident_bytes(), "arrival")
            self._memory_changed(evicted)
            self._outbox.report(self._report(profile=profile.to_proto()))
            log.info("loaded %s (%s) in %.2f s: p95 %.2f ms at batch 1, %.2f ms at batch %d", info.name,
                     info.variant_id[:12], load_s, profile.b1.p95_ms, profile.batch.p95_ms, self.config.batch)

    def _memory_changed(self, evicted: tuple[str, ...]) -> None:
        for variant_id in evicted:
            log.info("evicted %s from memory (budget %.1f MiB); it loads again on demand", variant_id[:12],
                     self.config.memory_budget_mib)
        self.metrics.memory(self.runtime.resident(), self.runtime.resident_bytes(), len(evicted))

    def _load_group(self, group: list[tuple]) -> None:
        fresh = []
        for info, path, fetch_s in group:
            loader = self._loader(info, path)
            start = time.perf_counter()
            try:
                ready = loader()
            except (variant.VariantError, OSError, RuntimeError, ValueError) as err:
                log.error("variant %s refused: %s", info.variant_id[:12], err)
                continue
            fresh.append((info, ready, fetch_s + time.perf_counter() - start, loader))
        if fresh:
            self._profile_and_hold(fresh)

    def sync_portfolio(self, variants: Iterable) -> None:
        """Fetch and load every variant not held yet, then profile them (as many at a time as the memory
        budget holds). A variant that fails to fetch, verify or build is never loaded."""
        with self._load_lock:
            fetched, seen = [], set(self.runtime.variants())
            for info in variants:
                if self.stopping.is_set():
                    return
                if info.variant_id in seen:
                    continue
                seen.add(info.variant_id)
                try:
                    fetched.append((info, *self._fetch(info)))
                except (FetchError, SecurityError, variant.VariantError, OSError, RuntimeError, ValueError) as err:
                    log.error("variant %s refused: %s", info.variant_id[:12], err)
            for group in budget_groups(fetched, self.config.memory_budget_bytes):
                if not self.stopping.is_set():
                    self._load_group(group)

    def adopt_portfolio(self, variants: list) -> None:
        """Load a new portfolio, move off the active variant if it left, and drop what left."""
        self.sync_portfolio(variants)
        wanted = {v.variant_id for v in variants}
        with self._decide_lock:
            if not any(o.variant_id in wanted for o in self.options()) or self.runtime.active is None:
                return  # nothing of the new portfolio could be loaded: keep serving the old one
            leaving = set(self.runtime.variants()) - wanted
            self._profiles = {k: v for k, v in self._profiles.items() if k not in leaving}
            if self.runtime.active.variant_id in leaving:
                choice = policies.initial_choice(self.policy, self.options())
                self._apply(self._chosen(choice, f"portfolio changed; {choice.label} fits best", "portfolio"))
            for variant_id in leaving:
                self.runtime.remove(variant_id)
                self.metrics.evicted(variant_id, self.runtime.resident_bytes())
                log.info("dropped %s: no longer in the portfolio", variant_id[:12])
            self._memory_changed(())

    def options(self) -> list[policies.Option]:
        known, profiles = self.runtime.variants(), self._profiles
        return [policies.Option(vid, known[vid].accuracy, p.batch.p50_ms, p.batch.p95_ms, known[vid].name,
                                known[vid].size_bytes)
                for vid, p in profiles.items() if vid in known]

    def profile_reports(self) -> list[coordinator_pb2.EdgeReport]:
        return [self._report(profile=p.to_proto()) for p in self._profiles.values()]

    def set_policy(self, policy: coordinator_pb2.Policy) -> None:
        try:
            self.policy = policies.PolicyConfig.from_proto(policy, window_s=self.config.window_s,
                                                           memory_budget_bytes=self.config.memory_budget_bytes)
        except ValueError as err:
            log.error("policy v%d refused, keeping v%d: %s", policy.version, self.policy.version, err)
            return
        self.metrics.slo(self.policy.slo_ms / 1e3)
        log.info("policy v%d: SLO p95 <= %.1f ms, pinned %s", self.policy.version, self.policy.slo_ms,
                 self.policy.pinned_variant[:12] or "none")

    # --- the coordinator's side of the link (edge.link.LinkHandler) ------------------------------
    def registered(self, reply: coordinator_pb2.RegisterResponse) -> None:
        self.set_policy(reply.policy)
        changed = {v.variant_id for v in reply.variants} != set(self.runtime.variants())
        if changed and not self._load_lock.locked():  # a load in progress gets its turn first
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
        return policies.Decision(choice.variant_id, reason, reason_code, state, switch=True,
                                 predicted_p95_ms=choice.p95_ms)

    def _apply(self, decision: policies.Decision, window: policies.Window | None = None) -> None:
        """Carry out a recorded decision (the caller holds the decision lock): switch if it says so (an
        on-demand load included), then count, log and report it with its inputs. The policy state moves
        on only once the switch happened."""
        active = self.runtime.active.variant_id if self.runtime.active else ""
        record = None
        if decision.switch:
            record = self.runtime.switch(decision.target, decision.reason)
            self.metrics.switched(decision.reason_code, record.switch_us / 1e6, self.runtime.variants(),
                                  decision.target)
            if record.load_s:
                self.metrics.loaded(decision.target, record.load_s, self.runtime.resident_bytes(), "on_demand")
            self._memory_changed(record.evicted)
        self._state = decision.state
        load_ms = record.load_s * 1e3 if record else 0.0
        log.info("%s %s -> %s in %.1f us%s: %s", "switch" if record else "decision", active[:12] or "-",
                 decision.target[:12], record.switch_us if record else 0.0,
                 f" after a {load_ms:.1f} ms load" if load_ms else "", decision.reason)
        self._outbox.event(self._report(switch=coordinator_pb2.SwitchEvent(
            timestamp=self._wall_clock(), from_variant=record.from_variant if record else active,
            to_variant=decision.target, reason=decision.reason, reason_code=decision.reason_code,
            observed_p95_ms=window.p95_ms if window else 0.0, switch_us=record.switch_us if record else 0.0,
            request_rate=window.rate if window else 0.0, window_requests=window.requests if window else 0,
            predicted_p95_ms=decision.predicted_p95_ms, slo_ms=self.policy.slo_ms,
            policy_version=self.policy.version, load_ms=load_ms, switched=record is not None,
            telemetry_missing=window is None and decision.reason_code == "fallback")))

    def start_serving(self) -> None:
        """Close the start-up window, activate the initial choice and report SERVING."""
        self._startup_window()
        with self._decide_lock:
            choice = policies.initial_choice(self.policy, self.options())
            self._apply(self._chosen(choice, f"initial choice: {choice.label}, profiled p95 {choice.p95_ms:.1f} ms "
                                     f"at batch {self.config.batch} (SLO {self.policy.slo_ms:.1f} ms)", "initial"))
        set_serving(self._health, True)

    def _startup_window(self) -> None:
        """Requests that came while nothing was active (refused UNAVAILABLE) say nothing about the portfolio
        held: their window is reported, but under no portfolio, so a rollout judging this edge as a
        canary (restarted mid-rollout, say) never counts them against the new portfolio."""
        stats = self._window.close_window(self._clock())
        if stats.requests:
            telemetry = self._telemetry(stats)
            telemetry.portfolio_id = ""
            self._outbox.telemetry(self._report(telemetry=telemetry))

    def _telemetry(self, stats) -> coordinator_pb2.Telemetry:
        cpu, rss = self._process.sample()
        active = self.runtime.active
        return coordinator_pb2.Telemetry(
            timestamp=self._wall_clock(), active_variant=active.variant_id if active else "",
            request_rate=stats.rate, p50_ms=stats.p50_ms, p95_ms=stats.p95_ms, p99_ms=stats.p99_ms,
            requests=stats.requests, errors=stats.errors, cpu_percent=cpu, rss_bytes=rss,
            resident_variants=len(self.runtime.resident()), portfolio_id=portfolio_id(self.runtime.variants()),
            policy_version=self.policy.version)

    def _policy_window(self, now: float) -> policies.Window | None:
        """Close the telemetry window and report it (kept while the cloud is away). None when telemetry
        is missing: the window could not be read, it is stale (the decision loop was held up for over
        `STALE_WINDOWS` windows), or requests came and none was answered (no latency to go by)."""
        try:
            stats = self._window.close_window(now)
            self._outbox.telemetry(self._report(telemetry=self._telemetry(stats)))
        except Exception:  # noqa: BLE001 - whatever broke, the policy must fall back, not stop
            log.exception("telemetry window unreadable")
            return None
        stale = self._decided_at is not None and now - self._decided_at > STALE_WINDOWS * self.policy.window_s
        answered = stats.requests - stats.errors
        if stale or (stats.requests and not answered):
            return None
        return policies.Window(answered, stats.p95_ms, stats.rate, self.runtime.config.slots)

    def decide_once(self) -> policies.Decision | None:
        """Close the window, report it, and switch if the policy says so."""
        window = self._policy_window(self._clock())
        with self._decide_lock:
            if self._state is None:
                return None
            now = self._clock()
            decision = policies.decide(self.policy, self.options(), self._state, window, now)
            if decision.recorded:
                try:
                    self._apply(decision, window)
                except (UnknownVariantError, variant.VariantError, OSError, RuntimeError, ValueError) as err:
                    log.error("switch to %s failed, staying on %s: %s", decision.target[:12],
                              self.runtime.active.variant_id[:12], err)
            else:
                self._state = decision.state
            self._decided_at = self._clock()
        return decision

    def decision_loop(self) -> None:
        while not self.stopping.wait(self.policy.window_s):
            try:
                self.decide_once()
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
