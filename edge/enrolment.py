"""How an edge gets its certificate (enrolment, once) and keeps it (renewal, over the link).

Enrolment (`enrol`): with a bootstrap token of `prunefleet certs token` and no certificate yet, the
edge makes its own P-256 key (written 0600, atomically, to DIR/enrol.key, so a restart goes on with it;
it never leaves the edge), sends a CSR for its name with the token to the cloud's enrolment port (TLS
checked against the CA beside the token, no client certificate) and asks again, backing off from
`poll_s` to `max_poll_s`, until the certificate comes (an operator approved) or `timeout_s` passes.
The certificate is checked (issued by the CA, for this key, naming this edge) and installed with the
key as DIR/key.pem and DIR/cert.pem (`edge.credentials.install`); the CA and the signing key's public
half are copied beside them. A refusal (unknown, expired or used token; a revoked name) ends it.

Renewal (`Renewer`): once its certificate has used `fraction` of its lifetime, the edge sends a CSR of
a new key on the mutual-TLS link, authenticated by its current certificate, installs what comes back
and swaps to it (`edge.credentials.Credentials.replace`). A refused or failed renewal is retried with
backoff until the certificate expires.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import PrunefleetError
from common.files import atomic_write_bytes
from common.identity import CLOUD_NAME, Identity, certificate_identity
from common.security import CA, CERT, KEY, SIGNING_PUB, Transport, read_secret, read_token
from edge.backoff import full_jitter
from edge.credentials import Credentials, RenewingTransport, expires_at, install, recover, renew_at
from protos import enrolment_pb2, enrolment_pb2_grpc

log = logging.getLogger(__name__)
PENDING_KEY = "enrol.key"
FATAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


class EnrolmentError(PrunefleetError, RuntimeError):
    """Enrolment refused or given up; the message says why."""


@dataclass(frozen=True)
class EnrolConfig:
    """One enrolment: where, as whom, with which token, into which directory, and how patiently."""

    address: str  # HOST:PORT of the cloud's enrolment port
    name: str
    token_file: Path  # beside it: ca.pem and signing.pub (the bundle of `certs token`)
    certs_dir: Path  # where the key and certificate go: what --certs then reads
    poll_s: float = 1.0
    max_poll_s: float = 30.0
    timeout_s: float = 3600.0  # give up after this long without a certificate
    rpc_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.address or not self.name:
            raise ValueError("enrolment needs the cloud's enrolment address and the edge's name")
        if not 0 < self.poll_s <= self.max_poll_s or not 0 < self.timeout_s <= 7 * 86400:
            raise ValueError("poll_s must be in (0, max_poll_s] and enrol timeout in (0, 7 days]")
        if self.rpc_timeout_s <= 0:
            raise ValueError("rpc_timeout_s must be positive")


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key, name: str) -> bytes:
    """A CSR for edge `name`, signed by `key`: its common name is all the cloud reads (with the key)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def check_certificate(cert_pem: bytes, key, name: str, ca_pem: bytes) -> None:
    """Raise EnrolmentError unless the certificate is the CA's, for `key`, naming edge `name`."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError) as err:
        raise EnrolmentError(f"the cloud sent a certificate that is not the CA's: {err}") from None
    if cert.public_key() != key.public_key():
        raise EnrolmentError("the cloud sent a certificate for another key")
    if certificate_identity(cert_pem) != Identity("edge", name):
        raise EnrolmentError(f"the cloud sent a certificate that does not name edge '{name}'")


def _pending_key(directory: Path):
    path = directory / PENDING_KEY
    if path.exists():
        return serialization.load_pem_private_key(read_secret(path), None)
    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write_bytes(path, _key_pem(key))
    os.chmod(path, 0o600)
    return key


def _bundle(config: EnrolConfig) -> bytes:
    """Copy the CA and the signing key's public half from the token's bundle (unless there already)."""
    config.certs_dir.mkdir(parents=True, exist_ok=True)
    for name in (CA, SIGNING_PUB):
        source, target = config.token_file.parent / name, config.certs_dir / name
        if not target.exists() and source.exists():
            shutil.copyfile(source, target)
    return read_secret(config.certs_dir / CA)


def _delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Half the base, then exponential backoff with full jitter: never a tight loop."""
    return base_s / 2 + full_jitter(attempt + 1, base_s, cap_s, rng)


def _ask(config: EnrolConfig, stub, request, stopping: threading.Event) -> bytes:
    """Enrol until issued; the certificate's PEM."""
    deadline, attempt, rng = time.monotonic() + config.timeout_s, 0, random.Random()
    while not stopping.is_set():
        try:
            reply = stub.Enrol(request, timeout=config.rpc_timeout_s)
            if reply.issued:
                return reply.certificate_pem
            log.info("enrolment request %s waits for approval (prunefleet certs approve)", reply.request_id)
            wait = max(reply.retry_after_s, _delay(attempt, config.poll_s, config.max_poll_s, rng))
        except grpc.RpcError as err:
            if err.code() in FATAL:
                raise EnrolmentError(f"enrolment refused: {err.code().name} {err.details()}") from None
            log.warning("enrolment at %s failed: %s %s", config.address, err.code().name, err.details())
            wait = _delay(attempt, config.poll_s, config.max_poll_s, rng)
        attempt += 1
        if time.monotonic() + wait > deadline:
            raise EnrolmentError(f"no certificate within {config.timeout_s:g} s; is the request approved?")
        stopping.wait(wait)
    raise EnrolmentError("stopped before enrolment finished")


def enrol(config: EnrolConfig, stopping: threading.Event) -> bool:
    """Make sure DIR holds this edge's key and certificate, enrolling when it does not (or holds an
    expired one). True when it enrolled now, False when DIR already held a valid certificate."""
    directory = Path(config.certs_dir)
    if directory.exists():
        recover(directory)
    if (directory / CERT).exists() and (directory / KEY).exists():
        if expires_at(read_secret(directory / CERT)) > time.time():
            return False
        log.warning("the certificate in %s has expired; enrolling again with the bootstrap token", directory)
    token, ca_pem = read_token(config.token_file), _bundle(config)
    key = _pending_key(directory)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(config.address, credentials, (("grpc.ssl_target_name_override", CLOUD_NAME),)) as ch:
        request = enrolment_pb2.EnrolRequest(token=token, csr_pem=csr_pem(key, config.name))
        cert_pem = _ask(config, enrolment_pb2_grpc.EnrolmentServiceStub(ch), request, stopping)
    check_certificate(cert_pem, key, config.name, ca_pem)
    install(directory, _key_pem(key), cert_pem)
    (directory / PENDING_KEY).unlink()
    log.info("enrolled as edge %s; key and certificate in %s", config.name, directory)
    return True


@dataclass(frozen=True)
class RenewalConfig:
    """When to renew (`fraction` of the lifetime used) and how to retry a renewal that failed."""

    fraction: float = 2 / 3
    retry_s: float = 1.0
    max_retry_s: float = 60.0
    rpc_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"renew fraction must be in (0, 1), got {self.fraction}")
        if not 0 < self.retry_s <= self.max_retry_s or self.rpc_timeout_s <= 0:
            raise ValueError("retry_s must be in (0, max_retry_s] and rpc_timeout_s positive")


class Renewer:
    """Renews this edge's certificate over the link before it expires (see the module's doc)."""

    def __init__(self, config: RenewalConfig, credentials: Credentials, channel, name: str):
        self.config, self._credentials, self._name = config, credentials, name
        self._stub = enrolment_pb2_grpc.EnrolmentServiceStub(channel)
        self.renewed = 0

    def renew_once(self) -> None:
        """One renewal: new key, CSR, Renew, check, install, swap. grpc.RpcError or EnrolmentError."""
        key = ec.generate_private_key(ec.SECP256R1())
        request = enrolment_pb2.RenewRequest(csr_pem=csr_pem(key, self._name))
        reply = self._stub.Renew(request, timeout=self.config.rpc_timeout_s)
        ca_pem = self._credentials.current()[0]
        check_certificate(reply.certificate_pem, key, self._name, ca_pem)
        if self._credentials.directory is not None:
            install(self._credentials.directory, _key_pem(key), reply.certificate_pem)
        self._credentials.replace(reply.certificate_pem, _key_pem(key))
        self.renewed += 1
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at(reply.certificate_pem)))
        log.info("certificate renewed; valid until %s", until)

    def run(self, stopping: threading.Event) -> None:
        """Renew whenever the certificate is due, until `stopping`."""
        attempt, rng = 0, random.Random()
        while not stopping.is_set():
            cert = self._credentials.current()[1]
            due = renew_at(cert, self.config.fraction) - time.time()
            if due > 0:
                stopping.wait(min(due, 60.0))
                continue
            try:
                self.renew_once()
                attempt = 0
                continue
            except grpc.RpcError as err:
                log.warning("certificate renewal failed: %s %s", err.code().name, err.details())
            except EnrolmentError as err:
                log.error("certificate renewal failed: %s", err)
            attempt += 1
            left = expires_at(cert) - time.time()
            if left <= 0:
                log.error("this edge's certificate has expired; enrol it again (prunefleet certs token)")
            stopping.wait(_delay(attempt, self.config.retry_s, self.config.max_retry_s, rng))


def add_arguments(run) -> None:
    """The enrolment and renewal flags of `prunefleet-edge run`."""
    run.add_argument(
        "--bootstrap-token",
        type=Path,
        default=None,
        metavar="FILE",
        help="enrol first when --certs DIR holds no certificate: a token of 'prunefleet certs token' "
        "(ca.pem and signing.pub beside it)",
    )
    run.add_argument("--enrol-cloud", default="", metavar="HOST:PORT", help="the cloud's enrolment port")
    run.add_argument("--enrol-timeout-s", type=float, default=3600.0, help="give up enrolling after this long")
    run.add_argument(
        "--renew",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="renew the certificate over the link once it has used 2/3 of its lifetime (default)",
    )


def enrol_from_arguments(args, stopping: threading.Event) -> None:
    """Enrol when --bootstrap-token asks for it (and --certs holds no certificate yet)."""
    if args.bootstrap_token is None:
        return
    if args.certs is None or args.insecure:
        raise EnrolmentError("--bootstrap-token needs --certs DIR (where the key and certificate go), not --insecure")
    if not args.enrol_cloud:
        raise EnrolmentError("--bootstrap-token needs --enrol-cloud HOST:PORT, the cloud's enrolment port")
    config = EnrolConfig(args.enrol_cloud, args.name, args.bootstrap_token, args.certs, timeout_s=args.enrol_timeout_s)
    enrol(config, stopping)


def renewing(transport: Transport, args) -> Transport:
    """The transport to run with: one that follows renewals (`edge.credentials`) when TLS and --renew."""
    if transport.insecure or not args.renew:
        return transport
    return RenewingTransport.following(Credentials(transport.ca, transport.cert, transport.key, args.certs))


class _NoRenewal:
    def close(self) -> None:
        pass


def start_renewal(transport: Transport, cloud: str, name: str, stopping: threading.Event):
    """Run a `Renewer` in its own thread when the transport follows renewals; what to close at the end
    (its channel, or nothing to close)."""
    if not isinstance(transport, RenewingTransport):
        return _NoRenewal()
    channel = transport.channel(cloud)
    renewer = Renewer(RenewalConfig(), transport.credentials, channel, name)
    threading.Thread(target=renewer.run, args=(stopping,), daemon=True, name="renew").start()
    return channel
