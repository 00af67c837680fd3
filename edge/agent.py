"""The agent: register, fetch and verify the portfolio, profile it here, serve, decide, report.

Two loops run beside the gRPC server: the decision loop closes a telemetry window every `window_s`,
asks the policy what to serve and switches locally; the link loop keeps one Connect stream to the
coordinator (reports up, policy and portfolio down) and reconnects with backoff and jitter. The
decision loop never waits for the link: with the cloud unreachable the agent keeps serving and
switching under its last policy, and switch events wait in a bounded buffer until the link is back.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2

from common import variant
from common.profiling import measure_latency
from common.wire import GRPC_OPTIONS
from edge import policy as policies
from edge.fetcher import FetchConfig, fetch
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime, loaded
from edge.server import INFERENCE_SERVICE
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2_grpc

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class AgentConfig:
    cloud: str
    name: str
    cache_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    threads: int = 1
    batch: int = 8  # typical batch, profiled on arrival
    max_batch: int = 256
    workers: int = 32
    profile_iters: int = 20
    max_pending_reports: int = 1000
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if not self.name or self.threads < 1 or self.workers < 2:
            raise ValueError("name must be set, threads >= 1 and workers >= 2")
        if not 1 <= self.batch <= self.max_batch:
            raise ValueError(f"batch must be in [1, {self.max_batch}]")


@dataclass(frozen=True)
class Profile:
    variant_id: str
    b1: object
    batch: object

    def to_proto(self) -> coordinator_pb2.VariantProfile:
        return coordinator_pb2.VariantProfile(
            variant_id=self.variant_id, p50_ms_b1=self.b1.p50_ms, p95_ms_b1=self.b1.p95_ms, batch=self.batch.batch,
            p50_ms_batch=self.batch.p50_ms, p95_ms_batch=self.batch.p95_ms)


class Agent:
    def __init__(self, config: AgentConfig, runtime: Runtime, metrics: EdgeMetrics, window, process_stats,
                 health_servicer, address: str, metrics_address: str):
        self.config, self.runtime, self.metrics = config, runtime, metrics
        self._window, self._process, self._health = window, process_stats, health_servicer
        self._address, self._metrics_address = address, metrics_address
        self._channel = grpc.insecure_channel(config.cloud, options=GRPC_OPTIONS)
        self._coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._portfolio = portfolio_pb2_grpc.PortfolioServiceStub(self._channel)
        self._policy = policies.PolicyConfig()
        self._state: policies.PolicyState | None = None
        self._profiles: dict[str, Profile] = {}
        self._reports: queue.Queue = queue.Queue(maxsize=config.max_pending_reports)
        self._unsent_switches: deque = deque(maxlen=config.max_pending_reports)
        self._load_lock = threading.Lock()
        self.stopping = threading.Event()

    # --- portfolio -------------------------------------------------------------------------------
    def _load(self, info) -> None:
        start = time.perf_counter()
        path = fetch(self._portfolio, info.variant_id, self.config.cache_dir, self.config.fetch)
        loaded_variant = variant.load(path, expected_sha256=info.variant_id)
        load_seconds = time.perf_counter() - start
        model, shape = loaded_variant.model, loaded_variant.spec.input_shape
        profile = Profile(info.variant_id, measure_latency(model, shape, 1, self.config.profile_iters),
                          measure_latency(model, shape, self.config.batch, self.config.profile_iters))
        self.runtime.add(loaded(info.variant_id, info.name or info.variant_id[:12], info.accuracy,
                                loaded_variant.spec, model, loaded_variant.size_bytes))
        self.metrics.loaded(info.variant_id, load_seconds,
                            sum(v.size_bytes for v in self.runtime.variants().values()))
        self._profiles = {**self._profiles, info.variant_id: profile}
        self._send(coordinator_pb2.EdgeReport(edge=self.config.name, profile=profile.to_proto()))
        log.info("loaded %s (%s): p50 %.2f ms at batch %d", info.name, info.variant_id[:12],
                 profile.batch.p50_ms, self.config.batch)

    def sync_portfolio(self, variants) -> None:
        """Fetch, verify, load and profile every variant not held yet. Bad variants are never loaded."""
        with self._load_lock:
            for info in variants:
                if info.variant_id in self.runtime.variants():
                    continue
                try:
                    self._load(info)
                except (variant.VariantError, OSError, RuntimeError) as err:
                    log.error("variant %s refused: %s", info.variant_id[:12], err)

    def options(self) -> list[policies.Option]:
        held = self.runtime.variants()
        return [policies.Option(vid, held[vid].name, held[vid].accuracy, p.batch.p50_ms, p.batch.p95_ms)
                for vid, p in self._profiles.items() if vid in held]

    # --- decisions -------------------------------------------------------------------------------
    def _apply(self, target: str, reason: str, reason_code: str, observed_p95: float) -> None:
        switch = self.runtime.switch(target)
        self.metrics.switched(reason_code, switch.switch_us / 1e6, self.runtime.variants(), target)
        name = self.runtime.variants()[target].name
        log.info("switch %s -> %s (%s): %s", switch.from_variant[:12] or "-", name, reason_code, reason)
        event = coordinator_pb2.SwitchEvent(timestamp=time.time(), from_variant=switch.from_variant,
                                            to_variant=target, reason=reason, reason_code=reason_code,
                                            observed_p95_ms=observed_p95, switch_us=switch.switch_us)
        self._unsent_switches.append(coordinator_pb2.EdgeReport(edge=self.config.name, switch=event))

    def start_serving(self) -> None:
        choice = policies.initial_choice(self._policy, self.options())
        self._state = policies.PolicyState(choice.variant_id, last_switch_at=time.monotonic())
        self._apply(choice.variant_id, f"initial choice: most accurate variant with profiled p95 "
                    f"{choice.p95_ms:.1f} ms within the SLO headroom", "initial", 0.0)
        for name in ("", INFERENCE_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def decide_once(self, now: float) -> None:
        stats = self._window.close(now)
        cpu, rss = self._process.sample()
        active = self.runtime.active.variant_id
        self._send(coordinator_pb2.EdgeReport(edge=self.config.name, telemetry=coordinator_pb2.Telemetry(
            timestamp=time.time(), active_variant=active, request_rate=stats.rate, p50_ms=stats.p50_ms,
            p95_ms=stats.p95_ms, p99_ms=stats.p99_ms, requests=stats.requests, errors=stats.errors,
            cpu_percent=cpu, rss_bytes=rss, resident_variants=len(self.runtime.variants()))))
        window = policies.Window(stats.requests, stats.rate, stats.p95_ms)
        decision = policies.decide(self._policy, self.options(), self._state, window, self.runtime.slots, now)
        self._state = decision.state
        if decision.switch and decision.target != active:
            self._apply(decision.target, decision.reason, decision.reason_code, stats.p95_ms)

    def decision_loop(self) -> None:
        while not self.stopping.wait(self._policy.window_s):
            self.decide_once(time.monotonic())

    # --- link to the coordinator -------------------------------------------------------------
    def _send(self, report) -> None:
        try:
            self._reports.put_nowait(report)
        except queue.Full:
            pass  # telemetry is best-effort while the link is down; switch events are kept apart

    def register(self):
        reply = self._coordinator.Register(coordinator_pb2.RegisterRequest(
            edge=self.config.name, address=self._address, metrics_address=self._metrics_address,
            threads=self.config.threads), timeout=RPC_TIMEOUT_S)
        self.set_policy(reply.policy)
        return reply

    def set_policy(self, policy) -> None:
        self._policy = policies.PolicyConfig.from_proto(policy)
        self.metrics.slo(self._policy.slo_ms / 1e3)
        log.info("policy v%d: SLO p95 <= %.1f ms", self._policy.version, self._policy.slo_ms)

    def _outgoing(self, alive: threading.Event):
        for profile in list(self._profiles.values()):
            yield coordinator_pb2.EdgeReport(edge=self.config.name, profile=profile.to_proto())
        while alive.is_set() and not self.stopping.is_set():
            while self._unsent_switches:
                yield self._unsent_switches.popleft()
            try:
                yield self._reports.get(timeout=0.2)
            except queue.Empty:
                continue

    def _handle(self, directive) -> None:
        kind = directive.WhichOneof("body")
        if kind == "policy":
            self.set_policy(directive.policy)
        elif kind == "portfolio":
            threading.Thread(target=self.sync_portfolio, args=(directive.portfolio.variants,), daemon=True).start()

    def link_loop(self, rng: random.Random) -> None:
        attempt = 0
        while not self.stopping.is_set():
            alive = threading.Event()
            alive.set()
            try:
                reply = self.register()
                if {v.variant_id for v in reply.variants} - set(self.runtime.variants()):
                    threading.Thread(target=self.sync_portfolio, args=(reply.variants,), daemon=True).start()
                for directive in self._coordinator.Connect(self._outgoing(alive)):
                    attempt = 0
                    self._handle(directive)
            except grpc.RpcError as err:
                log.warning("link to %s lost: %s", self.config.cloud, err.code().name)
            finally:
                alive.clear()
            attempt += 1
            self.stopping.wait(rng.uniform(0, min(10.0, 0.5 * 2 ** min(attempt, 5))))

    def close(self) -> None:
        self.stopping.set()
        self._channel.close()


def initial_portfolio(agent: Agent, rng: random.Random):
    """Register (retrying with backoff) and load the portfolio the coordinator names."""
    attempt = 0
    while not agent.stopping.is_set():
        try:
            reply = agent.register()
            agent.sync_portfolio(reply.variants)
            if agent.options():
                return
            log.warning("no usable variant in portfolio %s yet", reply.portfolio_id)
        except grpc.RpcError as err:
            log.warning("cannot register with %s: %s", agent.config.cloud, err.code().name)
        attempt += 1
        agent.stopping.wait(rng.uniform(0, min(10.0, 0.5 * 2 ** min(attempt, 5))))


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
