"""EnrolmentService: an edge gets its own certificate with a bootstrap token, and a new one before it expires.

Enrolment (as Kubernetes' kubelet TLS bootstrapping): an edge without a certificate calls `Enrol` on
the cloud's enrolment port (`--enrol-port`), which speaks TLS authenticated by the cloud's certificate
only (the edge has none yet) and serves nothing else. It sends a one-time token of `prunefleet certs
token` and a CSR for its name (`cloud.service.enrolment_store`, `cloud.service.issuer`); it gets its
certificate once the request is approved (a token bound to the name is approved already), asking again
with the same token and key meanwhile. A token made before the edge's name was last revoked is refused.

Renewal: an edge calls `Renew` on the mutual-TLS port with its current certificate (an edge's only,
its own name only, never a revoked one: `cloud.service.callers`) and a CSR of a new key.

Certificates live `lifetime_s` (default 7 days). The enrolment port faces callers nobody has
authenticated, so it bounds what they can take: messages of `max_request_bytes`, `max_rpcs` calls at
once, and `rate_per_s` calls per peer address (`burst` at once) and per edge name on `Renew`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from cloud.service import revocations
from cloud.service.enrolment_store import MAX_TOKEN_CHARS, EnrolmentStore, TokenRefused
from cloud.service.interceptors import ParseRequests
from cloud.service.issuer import Authority, CsrError, key_fingerprint, read_csr
from common.identity import Identity, peer_identity
from common.security import Transport
from protos import enrolment_pb2, enrolment_pb2_grpc

log = logging.getLogger(__name__)
DEFAULT_LIFETIME_S = 7 * 86400.0
STATE_FILE = "enrolment.sqlite"


@dataclass(frozen=True)
class EnrolmentConfig:
    """Where the CA and the tokens are, how long certificates live, and the enrolment port's bounds."""

    ca_dir: Path  # the CA of `prunefleet certs init` (ca.key, ca.pem): the cloud signs edge certificates
    state: Path  # the tokens and requests (`certs token` writes them): DIR/enrolment.sqlite of the cloud
    port: int | None = None  # the enrolment port (server-authenticated TLS); None: renewal only
    lifetime_s: float = DEFAULT_LIFETIME_S  # every certificate enrolment or renewal issues
    edge_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")  # DNS/IP names of edge certificates
    revoked: Path | None = None  # the revocation list: tokens made before a name's revocation are refused
    poll_s: float = 2.0  # what a pending request is told to wait before asking again
    max_request_bytes: int = 16 << 10
    max_rpcs: int = 16
    rate_per_s: float = 5.0
    burst: int = 20

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"enrol port must be in [0, 65535], got {self.port}")
        if not 10 <= self.lifetime_s <= 366 * 86400:
            raise ValueError(f"cert lifetime must be 10 s to 366 days, got {self.lifetime_s:g} s")
        if not self.edge_hosts or not 0.05 <= self.poll_s <= 600:
            raise ValueError("edge_hosts must name a host and poll_s be in [0.05, 600]")
        if not 1024 <= self.max_request_bytes <= 1 << 20 or self.max_rpcs < 1:
            raise ValueError("max_request_bytes must be in [1024, 1 MiB] and max_rpcs >= 1")
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("rate_per_s must be positive and burst >= 1")


class RateLimits:
    """A token bucket per key (a peer address, an edge name); the `max_keys` most recent are kept."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic, max_keys=10_000):
        self._rate, self._burst, self._clock, self._max = rate_per_s, burst, clock, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        with self._lock:
            now = self._clock()
            level, at = self._buckets.pop(key, (float(self._burst), now))
            level = min(float(self._burst), level + (now - at) * self._rate)
            self._buckets[key] = (level - 1 if level >= 1 else level, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return level >= 1


def _peer_host(context) -> str:
    peer = context.peer() or ""  # ipv4:1.2.3.4:5678, ipv6:[::1]:5678
    return peer.rpartition(":")[0] or peer


class EnrolmentServicer(enrolment_pb2_grpc.EnrolmentServiceServicer):
    """`Enrol` on the enrolment listener, `Renew` on the mutual-TLS one (`listener` says which this is)."""

    def __init__(self, config: EnrolmentConfig, authority: Authority, store: EnrolmentStore, listener: str):
        self.config, self._authority, self._store, self._listener = config, authority, store, listener
        self._limits = RateLimits(config.rate_per_s, config.burst)

    def _revoked_at(self, name: str) -> float | None:
        path = self.config.revoked
        if path is None or not path.exists():
            return None
        return revocations.parse(path.read_text(errors="replace")).get(Identity("edge", name).uri)

    def _sign(self, name: str, public_key) -> bytes:
        config = self.config
        return self._authority.edge_certificate(name, public_key, config.edge_hosts, config.lifetime_s)

    def Enrol(self, request: enrolment_pb2.EnrolRequest, context) -> enrolment_pb2.EnrolResponse:
        if self._listener != "enrol":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Enrol is served on the cloud's enrolment port only")
        if not self._limits.allow(_peer_host(context)):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many enrolment calls from this address; slow down")
        token = request.token
        if not 0 < len(token) <= MAX_TOKEN_CHARS or not token.isprintable():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token must be 1-{MAX_TOKEN_CHARS} printable characters")
        try:
            name, public_key = read_csr(request.csr_pem)
            enrolment = self._store.claim(token, name, key_fingerprint(public_key))
        except CsrError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except TokenRefused as err:
            code = grpc.StatusCode.UNAUTHENTICATED if err.unknown else grpc.StatusCode.PERMISSION_DENIED
            context.abort(code, str(err))
        revoked_at = self._revoked_at(name)
        if revoked_at is not None and enrolment.token_created_at <= revoked_at:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"edge '{name}' was revoked after this token was made")
        reply = enrolment_pb2.EnrolResponse(request_id=enrolment.id)
        if not enrolment.approved:
            reply.retry_after_s = self.config.poll_s
            return reply
        certificate = enrolment.certificate
        if certificate is None:
            certificate = self._sign(name, public_key)
            self._store.issued(enrolment.id, certificate)
            log.info("enrolled edge %s (request %s)", name, enrolment.id)
        reply.issued, reply.certificate_pem = True, certificate
        return reply

    def Renew(self, request: enrolment_pb2.RenewRequest, context) -> enrolment_pb2.RenewResponse:
        if self._listener != "mtls":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Renew is served on the cloud's mutual-TLS port only")
        caller = peer_identity(context)
        if caller is None or caller.role != "edge":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Renew takes an edge's certificate")
        if not self._limits.allow(caller.uri):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many renewals by {caller.uri}; slow down")
        try:
            name, public_key = read_csr(request.csr_pem)
        except CsrError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if name != caller.name:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"this certificate is edge '{caller.name}', the CSR names '{name}'"
            )
        log.info("renewed the certificate of edge %s", name)
        return enrolment_pb2.RenewResponse(certificate_pem=self._sign(name, public_key))


def servicers(config: EnrolmentConfig | None, transport: Transport) -> tuple:
    """(the mutual-TLS listener's, the enrolment listener's), sharing the CA and the token store;
    (None, None) without enrolment settings or in plaintext (no identities, nothing to enrol)."""
    if config is None or transport.insecure:
        return None, None
    authority, store = Authority.load(config.ca_dir), EnrolmentStore(config.state, time.time)
    store.prune()
    return EnrolmentServicer(config, authority, store, "mtls"), EnrolmentServicer(config, authority, store, "enrol")


def _listener_options(config: EnrolmentConfig) -> tuple:
    return (
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", 64 << 10),
        ("grpc.max_concurrent_streams", 4),
        ("grpc.max_connection_idle_ms", 30_000),
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.http2.max_pings_without_data", 2),
    )


async def start_listener(
    config: EnrolmentConfig, servicer: EnrolmentServicer, transport: Transport, host: str, pool: futures.Executor
) -> tuple[grpc.aio.Server, int]:
    """The enrolment port, started on the running loop: TLS with the cloud's certificate, no client
    certificate asked for, EnrolmentService alone. (server, 0) when the port cannot be bound."""
    server = grpc.aio.server(
        migration_thread_pool=pool,
        options=_listener_options(config),
        maximum_concurrent_rpcs=config.max_rpcs,
        interceptors=[ParseRequests()],
    )
    enrolment_pb2_grpc.add_EnrolmentServiceServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(transport.key, transport.cert)], require_client_auth=False)
    try:
        port = server.add_secure_port(f"{host}:{config.port}", credentials)
    except RuntimeError:
        port = 0
    if port:
        await server.start()
    return server, port


@dataclass
class EnrolListener:
    """The running enrolment port: where it listens, and how to stop it."""

    server: grpc.aio.Server
    port: int
    loop: asyncio.AbstractEventLoop

    @classmethod
    def start(cls, servicer: EnrolmentServicer | None, transport: Transport, host: str, pool, loop):
        """Start it on `loop` (running in another thread); None when there is no enrolment port (no
        servicer, or its settings name no port); OSError when the port cannot be bound."""
        if servicer is None or servicer.config.port is None:
            return None
        config = servicer.config
        started = asyncio.run_coroutine_threadsafe(start_listener(config, servicer, transport, host, pool), loop)
        server, port = started.result(60)
        if port == 0:
            raise OSError(f"cannot bind the enrolment port {host}:{config.port}")
        log.info("enrolment on %s:%d", host, port)
        return cls(server, port, loop)

    def stop(self, grace: float) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(grace + 10)
