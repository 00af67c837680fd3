"""The cloud process: PortfolioService and CoordinatorService on one gRPC server, plus metrics."""

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

from cloud.coordinator import CoordinatorServicer
from cloud.fleet import FleetDB
from cloud.portfolio_service import PortfolioServicer, list_variants
from cloud.store import PortfolioStore
from common.wire import SERVER_OPTIONS
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2, portfolio_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudConfig:
    store: Path
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int | None = None
    db: Path | None = None  # default: STORE/fleet.sqlite
    workers: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.workers < 4:
            raise ValueError("workers must be >= 4")


@dataclass
class CloudServer:
    server: grpc.Server
    port: int
    db: FleetDB

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait()
        self.db.close()


def _service_names() -> tuple[str, ...]:
    return (portfolio_pb2.DESCRIPTOR.services_by_name["PortfolioService"].full_name,
            coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name,
            health.SERVICE_NAME, reflection.SERVICE_NAME)


def _portfolio_gauges(store: PortfolioStore, registry: CollectorRegistry) -> None:
    """What an edge must hold to have the whole portfolio: the dashboard's transfer progress."""
    Gauge("prunefleet_cloud_portfolio_variants", "Variants in the portfolio being served",
          registry=registry).set_function(lambda: len(store.manifest().variants))
    Gauge("prunefleet_cloud_portfolio_bytes", "Bytes of the variant files of the portfolio being served",
          registry=registry).set_function(lambda: sum(v.size_bytes for v in store.manifest().variants))


def start(config: CloudConfig, registry: CollectorRegistry) -> CloudServer:
    store = PortfolioStore(config.store)
    store.manifest()  # fail now, with the store's message, when there is no portfolio
    db = FleetDB(config.db or config.store / "fleet.sqlite", clock=time.time)
    sent = Counter("prunefleet_cloud_variant_bytes_sent_total", "Variant bytes streamed to edges",
                   registry=registry)
    edges = Gauge("prunefleet_cloud_edges", "Edges known to the coordinator", registry=registry)
    edges.set_function(db.edge_count)
    _portfolio_gauges(store, registry)
    ProcessCollector(registry=registry)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=SERVER_OPTIONS)
    portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server(PortfolioServicer(store, on_bytes_sent=sent.inc), server)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(db, lambda: list_variants(store), time.time), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_service_names(), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    for name in _service_names()[:2] + ("",):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return CloudServer(server, port, db)


def serve(config: CloudConfig) -> None:
    """Run until SIGINT or SIGTERM; prints one line with the bound address once serving."""
    registry = CollectorRegistry()
    cloud = start(config, registry)
    metrics = ""
    if config.metrics_port is not None:
        http, _ = start_http_server(config.metrics_port, config.host, registry=registry)
        metrics = f" metrics on {config.host}:{http.server_port}"
    print(f"prunefleet cloud serving on {config.host}:{cloud.port}{metrics}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    cloud.stop()
