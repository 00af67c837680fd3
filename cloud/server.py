"""The cloud process: PortfolioService and CoordinatorService on one gRPC server, plus metrics.

Mutual TLS unless the transport is plaintext (`--insecure`); operator RPCs need the bearer token when
one is configured (always with TLS); variants are signed when the cloud has a signing key.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, start_http_server

from cloud.catalog import Catalog
from cloud.coordinator import HEARTBEAT_S, OPERATOR_METHODS, CoordinatorServicer
from cloud.fleet import FleetDB
from cloud.portfolio_service import PortfolioServicer
from common.security import RequireToken, SecurityError, Signer, Transport
from common.wire import SERVER_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2, portfolio_pb2_grpc

log = logging.getLogger(__name__)
ROLLOUT_TICK_S = 1.0


@dataclass(frozen=True)
class CloudConfig:
    store: Path
    transport: Transport  # mutual TLS, or plaintext when built with Transport.plaintext() (--insecure)
    signing_key: Path | None = None  # Ed25519 private key (PEM); variants go out unsigned without it
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    db: Path | None = None  # default: STORE/fleet.sqlite
    workers: int = 64
    rollout_tick_s: float = ROLLOUT_TICK_S
    heartbeat_s: float = HEARTBEAT_S  # an idle edge stream carries an empty directive this often

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.workers < 4:
            raise ValueError("workers must be >= 4")
        if not self.transport.insecure and not self.transport.token:
            raise SecurityError("with TLS the cloud needs an operator token")
        if not 0.05 <= self.rollout_tick_s <= 60 or not 0.05 <= self.heartbeat_s <= 60:
            raise ValueError("rollout_tick_s and heartbeat_s must be in [0.05, 60]")


@dataclass
class CloudServer:
    server: grpc.Server
    port: int
    db: FleetDB
    coordinator: CoordinatorServicer
    stopping: threading.Event

    def stop(self, grace: float = 2.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        self.db.close()


def _service_names() -> tuple[str, ...]:
    return (portfolio_pb2.DESCRIPTOR.services_by_name["PortfolioService"].full_name,
            coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
            health.SERVICE_NAME, reflection.SERVICE_NAME)


def _portfolio_gauges(catalog: Catalog, registry: CollectorRegistry) -> None:
    """What an edge must hold to have the whole portfolio: the dashboard's transfer progress."""
    Gauge("prunefleet_cloud_portfolio_variants", "Variants in the portfolio being served",
          registry=registry).set_function(lambda: len(catalog.manifest().variants))
    Gauge("prunefleet_cloud_portfolio_bytes", "Bytes of the variant files of the portfolio being served",
          registry=registry).set_function(lambda: sum(v.size_bytes for v in catalog.manifest().variants))


def _judge_rollouts(coordinator: CoordinatorServicer, stopping: threading.Event, every_s: float) -> None:
    while not stopping.wait(every_s):
        try:
            coordinator.rollouts.tick()
        except Exception:  # a failed judgement is retried on the next tick
            log.exception("judging the rollout failed")


def start(config: CloudConfig, registry: CollectorRegistry) -> CloudServer:
    db = FleetDB(config.db or config.store / "fleet.sqlite", clock=time.time)
    signer = Signer.load(config.signing_key) if config.signing_key else None
    catalog = Catalog(db, signer)
    catalog.start_with(config.store)  # fail now, with the store's message, when there is no portfolio
    sent = Counter("prunefleet_cloud_variant_bytes_sent_total", "Variant bytes streamed to edges",
                   registry=registry)
    edges = Gauge("prunefleet_cloud_edges", "Edges known to the coordinator", registry=registry)
    edges.set_function(db.edge_count)
    _portfolio_gauges(catalog, registry)
    ProcessCollector(registry=registry)
    token = config.transport.token
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=SERVER_OPTIONS,
                         interceptors=[RequireToken(token, OPERATOR_METHODS)] if token else [])
    portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server(PortfolioServicer(catalog, on_bytes_sent=sent.inc),
                                                              server)
    coordinator = CoordinatorServicer(db, catalog, time.time, config.heartbeat_s)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(coordinator, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_service_names(), server)
    port = config.transport.bind(server, f"{config.host}:{config.port}")
    if port == 0:
        db.close()
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    for name in _service_names()[:2] + ("",):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stopping = threading.Event()
    threading.Thread(target=_judge_rollouts, args=(coordinator, stopping, config.rollout_tick_s), daemon=True,
                     name="rollouts").start()
    return CloudServer(server, port, db, coordinator, stopping)


def serve(config: CloudConfig) -> None:
    """Run until SIGINT or SIGTERM; prints one line with the bound address once serving."""
    registry = CollectorRegistry()
    cloud = start(config, registry)
    metrics = ""
    if config.metrics_port is not None:
        http, _ = start_http_server(config.metrics_port, config.host, registry=registry)
        metrics = f" metrics on {config.host}:{http.server_port}"
    mode = "plaintext (--insecure)" if config.transport.insecure else "mutual TLS"
    print(f"prunefleet cloud serving on {config.host}:{cloud.port}{metrics} ({mode})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    cloud.stop()
