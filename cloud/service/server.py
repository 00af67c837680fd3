"""The cloud process: PortfolioService and CoordinatorService on one gRPC server, plus metrics.

Mutual TLS unless the transport is plaintext (`--insecure`); operator RPCs need the operator's
certificate and the bearer token (always with TLS), edge RPCs an edge's certificate, and operator calls
have capacity of their own (`cloud.service.callers`); variants are signed when the cloud has a signing key.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    start_http_server,
)

from cloud.service.callers import CallerLimits, CheckCallers
from cloud.service.catalog import Catalog
from cloud.service.coordinator import BIND_TIMEOUT_S, HEARTBEAT_S, OPERATOR_METHODS, CoordinatorServicer
from cloud.service.deploys import DeployConfig
from cloud.service.enrolment import EnrolListener, EnrolmentConfig, servicers
from cloud.service.fleet_db import FleetDB
from cloud.service.interceptors import ParseRequests
from cloud.service.portfolio_service import PortfolioServicer, add_to_server
from cloud.service.report_pace import PaceConfig, ReportPace
from cloud.service.report_writer import ReportWriter, WriterConfig
from cloud.service.retention import Retention, RetentionConfig
from cloud.service.revocations import Revocations
from common.escaping import escape_logs
from common.security import SecurityError, Signer, Transport
from common.token_check import RequireTokenAsync
from common.wire import SERVER_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc, enrolment_pb2_grpc, portfolio_pb2

log = logging.getLogger(__name__)
ROLLOUT_TICK_S = 1.0
_PACED = ("prunefleet_cloud_reports_paced_total", "Edge reports that waited their turn under report pacing")
MAX_RPCS = 10_000  # the bound on edges per coordinator (each holds one stream); operator calls have their own


@dataclass(frozen=True)
class CloudConfig:
    store: Path
    transport: Transport  # mutual TLS, or plaintext when built with Transport.plaintext() (--insecure)
    signing_key: Path | None = None  # Ed25519 private key (PEM); variants go out unsigned without it
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    db: Path | None = None  # default: STORE/fleet.sqlite
    workers: int = 64  # threads for unary RPCs and variant downloads (edge streams need none)
    max_rpcs: int = MAX_RPCS  # RPCs at once, edge streams included, operator calls not; beyond: RESOURCE_EXHAUSTED
    operator_rpcs: int = 64  # operator calls in progress at once, apart from the above: edges cannot take them
    fetches_per_caller: int = 8  # variant downloads one certificate may hold at once
    bind_timeout_s: float = BIND_TIMEOUT_S  # a Connect stream without a first report is closed after this
    rollout_tick_s: float = ROLLOUT_TICK_S
    report_tick_s: float = 0.1  # edge reports are stored in one transaction per tick
    heartbeat_s: float = HEARTBEAT_S  # an idle edge stream carries an empty directive this often
    retention: RetentionConfig = RetentionConfig()  # what the fleet database keeps (cloud.service.retention)
    revoked: Path | None = None  # the revocation list (cloud.service.revocations), reread when it changes
    deploys: DeployConfig = DeployConfig()  # portfolio root, uploads and store bounds (cloud.service.deploys)
    enrolment: EnrolmentConfig | None = None  # edge certificates: enrolment port and renewal (TLS only)
    pace: PaceConfig = PaceConfig()  # each edge's reports read at most at this rate (cloud.service.report_pace)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.workers < 4:
            raise ValueError("workers must be >= 4")
        if self.max_rpcs < self.workers:
            raise ValueError("max_rpcs must be >= workers")
        if not self.transport.insecure and not self.transport.token:
            raise SecurityError("with TLS the cloud needs an operator token")
        if not 0.05 <= self.rollout_tick_s <= 60 or not 0.05 <= self.heartbeat_s <= 60:
            raise ValueError("rollout_tick_s and heartbeat_s must be in [0.05, 60]")
        WriterConfig(tick_s=self.report_tick_s)  # validates it
        self.limits()  # validates them
        if not 0.05 <= self.bind_timeout_s <= 600:
            raise ValueError(f"bind_timeout_s must be in [0.05, 600], got {self.bind_timeout_s}")

    def limits(self) -> CallerLimits:
        return CallerLimits(self.max_rpcs, self.operator_rpcs, self.fetches_per_caller)


@dataclass
class CloudServer:
    port: int
    db: FleetDB
    coordinator: CoordinatorServicer
    reports: ReportWriter
    stopping: threading.Event
    loop: asyncio.AbstractEventLoop
    server: grpc.aio.Server
    thread: threading.Thread
    pool: futures.ThreadPoolExecutor
    retention: Retention | None = None
    enrol: EnrolListener | None = None  # the enrolment port, when the cloud has one

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving (streams get `grace` seconds), store the reports still queued, close the database."""
        self.stopping.set()
        if self.enrol is not None:
            self.enrol.stop(grace)
        if self.retention is not None:
            self.retention.stop()
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(grace + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.reports.close()
            self.db.close()


def _service_names() -> tuple[str, ...]:
    return (
        portfolio_pb2.DESCRIPTOR.services_by_name["PortfolioService"].full_name,
        coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )


def _portfolio_gauges(catalog: Catalog, registry: CollectorRegistry, coordinator: CoordinatorServicer) -> None:
    """The edge streams open now, and what an edge must hold to have the whole portfolio: the
    dashboard's transfer progress."""
    Gauge("prunefleet_cloud_streams", "Edge streams open now", registry=registry).set_function(
        lambda: coordinator.streams
    )
    Gauge(
        "prunefleet_cloud_portfolio_variants", "Variants in the portfolio being served", registry=registry
    ).set_function(lambda: len(catalog.manifest().variants))
    Gauge(
        "prunefleet_cloud_portfolio_bytes",
        "Bytes of the variant files of the portfolio being served",
        registry=registry,
    ).set_function(lambda: sum(v.size_bytes for v in catalog.manifest().variants))


def _fleet_metrics(db: FleetDB, registry: CollectorRegistry) -> tuple[Counter, Counter, Counter]:
    """Edges known, and the counters of edge input: reports stored and given up (the report writer's),
    and Register calls and reports refused by `cloud.service.validation`, by kind."""
    Gauge("prunefleet_cloud_edges", "Edges known to the coordinator", registry=registry).set_function(db.edge_count)
    refused = Counter(
        "prunefleet_cloud_reports_refused_total",
        "Edge input refused by the coordinator's checks, by kind (register, telemetry, switch, profile)",
        ["kind"],
        registry=registry,
    )
    for kind in ("register", "telemetry", "switch", "profile"):
        refused.labels(kind)  # present at 0 before the first refusal, so a query never comes back empty
    return (
        refused,
        Counter(
            "prunefleet_cloud_reports_stored_total", "Edge reports stored in the fleet database", registry=registry
        ),
        Counter(
            "prunefleet_cloud_reports_dropped_total", "Edge reports given up after failed commits", registry=registry
        ),
    )


def _judge_rollouts(coordinator: CoordinatorServicer, stopping: threading.Event, every_s: float) -> None:
    while not stopping.wait(every_s):
        try:
            coordinator.rollouts.tick()
        except Exception:  # a failed judgement is retried on the next tick
            log.exception("judging the rollout failed")


def _watch_revocations(revocations: Revocations, coordinator: CoordinatorServicer, stopping: threading.Event) -> None:
    """Reread the revocation list every second; end the streams of edges revoked since."""
    while not stopping.wait(1.0):
        try:
            fresh = revocations.reload()
        except OSError:
            log.exception("reading the revocation list failed")
            continue
        coordinator.revoked({uri.rsplit("/", 1)[-1] for uri in fresh if "/edge/" in uri})


async def _serve(
    config: CloudConfig,
    catalog: Catalog,
    coordinator: CoordinatorServicer,
    sent: Counter,
    pool: futures.ThreadPoolExecutor,
    revocations: Revocations,
    renewal=None,
) -> tuple[grpc.aio.Server, int]:
    """Build and start the gRPC server on the running loop; (server, 0) when the port cannot be bound."""
    tls = not config.transport.insecure
    token, callers = config.transport.token, CheckCallers(OPERATOR_METHODS, config.limits(), tls, revocations)
    server = grpc.aio.server(
        migration_thread_pool=pool,
        options=SERVER_OPTIONS,
        interceptors=[callers, *([RequireTokenAsync(token, OPERATOR_METHODS)] if token else []), ParseRequests()],
    )
    portfolios = PortfolioServicer(catalog, on_bytes_sent=sent.inc, blocking=pool)
    add_to_server(portfolios, server)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(coordinator, server)
    if renewal is not None:
        enrolment_pb2_grpc.add_EnrolmentServiceServicer_to_server(renewal, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_service_names(), server)
    port = config.transport.bind(server, f"{config.host}:{config.port}")
    if port == 0:
        return server, 0
    await server.start()
    for name in _service_names()[:2] + ("",):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def start(config: CloudConfig, registry: CollectorRegistry) -> CloudServer:
    """Serve on an event loop in its own thread; returns once the port is bound and serving."""
    db = FleetDB(
        config.db or config.store / "fleet.sqlite", clock=time.time, keep_profiles=config.retention.keep_profiles
    )
    signer = Signer.load(config.signing_key) if config.signing_key else None
    catalog = Catalog(db, signer, config.deploys.limits, validity_s=config.deploys.listing_validity_s)
    catalog.start_with(config.store)  # fail now, with the store's message, when there is no portfolio
    sent = Counter("prunefleet_cloud_variant_bytes_sent_total", "Variant bytes streamed to edges", registry=registry)
    pool = futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc")
    refused, stored, dropped = _fleet_metrics(db, registry)
    reports = ReportWriter(db, WriterConfig(tick_s=config.report_tick_s), on_stored=stored.inc, on_dropped=dropped.inc)
    coordinator = CoordinatorServicer(
        db,
        catalog,
        time.time,
        reports,
        blocking=pool,
        heartbeat_s=config.heartbeat_s,
        refused=lambda kind: refused.labels(kind).inc(),
        bind_timeout_s=config.bind_timeout_s,
        deploys=config.deploys,
        pace=ReportPace(config.pace, on_paced=Counter(*_PACED, registry=registry).inc),
    )
    _portfolio_gauges(catalog, registry, coordinator)
    ProcessCollector(registry=registry)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="grpc-loop")
    thread.start()
    revocations = Revocations(config.revoked)
    revocations.reload()
    renewal, enrol = servicers(config.enrolment, config.transport)
    serving = _serve(config, catalog, coordinator, sent, pool, revocations, renewal)
    server, port = asyncio.run_coroutine_threadsafe(serving, loop).result(60)
    stopping = threading.Event()
    cloud = CloudServer(port, db, coordinator, reports, stopping, loop, server, thread, pool)
    if port == 0:
        cloud.stop(0)
        raise OSError(f"cannot bind {config.host}:{config.port}")
    threading.Thread(
        target=_judge_rollouts, args=(coordinator, stopping, config.rollout_tick_s), daemon=True, name="rollouts"
    ).start()
    threading.Thread(
        target=_watch_revocations, args=(revocations, coordinator, stopping), daemon=True, name="revocations"
    ).start()
    cloud.retention = Retention(db, config.retention, coordinator.connected).start()
    cloud.enrol = EnrolListener.start(enrol, config.transport, config.host, pool, loop)
    return cloud


def serve(config: CloudConfig) -> None:
    """Run until SIGINT or SIGTERM; prints one line with the bound address once serving. Every log line
    is escaped from here on (`common.escaping`): what edges send can never forge one."""
    escape_logs()
    registry = CollectorRegistry()
    cloud = start(config, registry)
    metrics = ""
    if config.metrics_port is not None:
        http, _ = start_http_server(config.metrics_port, config.host, registry=registry)
        metrics = f" metrics on {config.host}:{http.server_port}"
    mode = "plaintext (--insecure)" if config.transport.insecure else "mutual TLS"
    enrol = f", enrolment on {config.host}:{cloud.enrol.port}" if cloud.enrol else ""
    print(f"prunefleet cloud serving on {config.host}:{cloud.port}{metrics} ({mode}{enrol})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    cloud.stop()
