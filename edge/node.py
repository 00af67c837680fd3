"""One wired edge agent: its InferenceService, metrics endpoint, channel to the cloud, agent and link.

`assemble` builds every part from the agent's settings (`edge.config.AgentConfig`) and a transport,
starting the servers (the InferenceService NOT_SERVING until the agent starts serving) but no loop:
the command line (`edge.cli`) runs the loops, and the same wiring can run inside another process.
The cache directory is locked first (`edge.cache.CacheLock`): a second agent on it refuses to start
before it binds a port. `Node.close` stops what `assemble` started and releases the lock. The agent's
`ListingGuard` (`edge.listing_guard`) counts the listings it refuses on the agent's registry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server

from common.security import Transport, Verifier
from edge.agent import Agent
from edge.batching import BatchConfig, MicroBatcher
from edge.cache import CacheLock
from edge.config import AgentConfig
from edge.fetcher import portfolio_stub
from edge.link import Link, LinkConfig, Outbox
from edge.listing_guard import ListingGuard
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime, RuntimeConfig
from edge.server import InferenceServicer, make_server, set_serving
from edge.telemetry import ProcessStats, RequestWindow
from protos import coordinator_pb2_grpc

STOP_GRACE_S = 2.0


@dataclass(frozen=True)
class Node:
    """One wired agent: its servers, channel and loops. `close` stops what `assemble` started."""

    agent: Agent
    link: Link
    server: grpc.Server
    health: object
    http: object
    channel: grpc.Channel
    address: str
    metrics_address: str
    batcher: MicroBatcher | None = None
    cache_lock: CacheLock | None = None

    def banner(self) -> str:
        return f"prunefleet-edge {self.agent.config.name} serving on {self.address} metrics on {self.metrics_address}"

    def close(self) -> None:
        set_serving(self.health, False)
        self.server.stop(STOP_GRACE_S).wait()
        if self.batcher is not None:
            self.batcher.close()
        self.channel.close()
        self.http.shutdown()
        if self.cache_lock is not None:
            self.cache_lock.release()


def assemble(config: AgentConfig, stopping: threading.Event, transport: Transport) -> Node:
    """Lock the cache, start the InferenceService (NOT_SERVING) and the metrics endpoint, and wire the
    agent to them."""
    cache_lock = CacheLock.acquire(config.cache_dir)
    try:
        return _wire(config, stopping, transport, cache_lock)
    except BaseException:
        cache_lock.release()
        raise


def _listing_guard(config: AgentConfig, verifier: Verifier | None, registry: CollectorRegistry) -> ListingGuard:
    """The agent's check of listings, its refusals counted by reason on the agent's registry."""
    refused = Counter(
        "prunefleet_edge_listings_refused_total",
        "Portfolio listings refused: unsigned, bad signature, expired, older version, ...",
        ["edge", "reason"],
        registry=registry,
    )
    return ListingGuard(verifier, config.cache_dir, lambda reason: refused.labels(config.name, reason).inc())


def _wire(config: AgentConfig, stopping: threading.Event, transport: Transport, cache_lock: CacheLock) -> Node:
    verifier = Verifier.load(config.verify_key) if config.verify_key else None
    registry = CollectorRegistry()
    listings = _listing_guard(config, verifier, registry)
    metrics = EdgeMetrics(registry, config.name, slo_s=config.slo_ms / 1e3)
    http, _ = start_http_server(config.metrics_port, config.host, registry=registry)
    metrics.budget(config.memory_budget_bytes)
    runtime = Runtime(
        RuntimeConfig(slots=config.threads, max_batch=config.max_batch, memory_budget_bytes=config.memory_budget_bytes)
    )
    window = RequestWindow(time.monotonic())
    batcher = (
        MicroBatcher(runtime, BatchConfig(config.batch_delay_ms, config.max_batch, config.threads), metrics.batched)
        if config.batch_delay_ms
        else None
    )
    server, port, health = make_server(
        InferenceServicer(runtime, window, metrics, batcher),
        config.host,
        config.port,
        config.workers,
        None if transport.insecure else transport.server_credentials(),
        config.max_pending,
    )
    channel = transport.channel(config.cloud)
    address, metrics_address = f"{config.public_host}:{port}", f"{config.public_host}:{http.server_port}"
    link_config = LinkConfig(
        edge=config.name,
        address=address,
        metrics_address=metrics_address,
        threads=config.threads,
        backoff_s=config.backoff_s,
        max_backoff_s=config.max_backoff_s,
    )
    outbox = Outbox(link_config.max_buffered, link_config.max_live, link_config.max_telemetry)
    agent = Agent(
        config,
        runtime,
        metrics,
        window,
        ProcessStats(),
        health,
        portfolio_stub(channel),
        outbox,
        stopping,
        verifier=verifier,
        listings=listings,
    )
    link = Link(link_config, coordinator_pb2_grpc.CoordinatorServiceStub(channel), outbox, stopping)
    return Node(agent, link, server, health, http, channel, address, metrics_address, batcher, cache_lock)
