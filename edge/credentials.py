"""The edge's certificate as something that changes while it runs: files, channels and the server's TLS.

`Credentials` holds the current (CA, certificate, key). `RenewingTransport` is a `common.security.Transport`
whose channels (`SwappableChannel`) and server credentials follow it: when a renewal installs a new
certificate, new calls to the cloud go over a channel built with it (the old one is closed after
`close_grace_s`, which ends the link's stream and makes it reconnect), and the InferenceService presents
it from its next TLS handshake on (gRPC's dynamic server credentials: connections already open keep
theirs, so no request fails). Files are replaced through a journal (`install`): a crash between the
key and the certificate leaves `next.pem`, which `recover` finishes on the next start.

`renew_at` is when a certificate has used `fraction` of its lifetime. Its lifetime starts at issue,
which is `ISSUER_BACKDATE_S` after `not_valid_before` (the issuer backdates for clock skew).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509

from common.files import atomic_write_bytes, fsync_dir
from common.security import CERT, KEY, Transport
from common.wire import CHANNEL_OPTIONS

log = logging.getLogger(__name__)
ISSUER_BACKDATE_S = 300.0  # `prunefleet certs` and the cloud set not_valid_before five minutes before issue
JOURNAL = "next.pem"


def renew_at(cert_pem: bytes, fraction: float = 2 / 3) -> float:
    """Unix time at which the certificate has used `fraction` of its lifetime."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    issued = min(start + ISSUER_BACKDATE_S, end)
    return issued + fraction * (end - issued)


def expires_at(cert_pem: bytes) -> float:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()


def _write(path: Path, data: bytes, secret: bool) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600 if secret else 0o644)


def install(directory: Path, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace DIR/key.pem and DIR/cert.pem together: the pair goes to the journal first."""
    directory = Path(directory)
    _write(directory / JOURNAL, key_pem + cert_pem, secret=True)
    recover(directory)


def recover(directory: Path) -> bool:
    """Finish an `install` a crash interrupted (DIR/next.pem holds the key, then the certificate)."""
    journal = Path(directory) / JOURNAL
    if not journal.exists():
        return False
    data = journal.read_bytes()
    split = data.find(b"-----BEGIN CERTIFICATE-----")
    if split <= 0:  # the journal write itself was cut short: the old pair is still whole
        journal.unlink()
        return False
    _write(Path(directory) / KEY, data[:split], secret=True)
    _write(Path(directory) / CERT, data[split:], secret=False)
    journal.unlink()
    fsync_dir(Path(directory))
    return True


class Credentials:
    """The current (CA, certificate, key), thread-safe; channels that follow it are swapped on `replace`."""

    def __init__(self, ca: bytes, cert: bytes, key: bytes, directory: Path | None = None, close_grace_s: float = 5.0):
        self._lock, self._close_grace_s = threading.Lock(), close_grace_s
        self.directory = Path(directory) if directory is not None else None  # where renewals are installed
        self._pems, self.version = (ca, cert, key), 0
        self._channels: list[tuple[SwappableChannel, str, tuple]] = []

    def current(self) -> tuple[bytes, bytes, bytes]:
        with self._lock:
            return self._pems

    def transport(self) -> Transport:
        return Transport.holding(*self.current())

    def follow(self, channel: SwappableChannel, address: str, options: tuple) -> None:
        with self._lock:
            self._channels.append((channel, address, options))

    def replace(self, cert: bytes, key: bytes) -> None:
        """Use this certificate from now on: every following channel is rebuilt with it."""
        with self._lock:
            self._pems, self.version = (self._pems[0], cert, key), self.version + 1
            channels = list(self._channels)
        transport = self.transport()
        for channel, address, options in channels:
            channel.swap(transport.channel(address, options), self._close_grace_s)

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS requiring a client certificate of the CA, presenting the current certificate at every new
        handshake (gRPC asks `fetch` before each)."""
        seen = {"version": self.version}

        def config():
            ca, cert, key = self.current()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch():
            if seen["version"] == self.version:
                return None
            seen["version"] = self.version
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=True)


class _Follower:
    """A multicallable of whichever channel is current when it is called."""

    def __init__(self, owner: SwappableChannel, kind: str, args: tuple, kwargs: dict):
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs
        self._made: tuple[object, object] | None = None

    def _target(self):
        channel = self._owner.current
        made = self._made
        if made is None or made[0] is not channel:
            made = (channel, getattr(channel, self._kind)(*self._args, **self._kwargs))
            self._made = made
        return made[1]

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._target(), name)


class SwappableChannel(grpc.Channel):
    """A channel whose calls go to the channel set last (`swap`); stubs built on it follow the swaps."""

    def __init__(self, channel: grpc.Channel):
        self.current, self._closed = channel, False

    def swap(self, channel: grpc.Channel, close_grace_s: float) -> None:
        old, self.current = self.current, channel
        if self._closed:
            channel.close()
        timer = threading.Timer(close_grace_s, old.close)
        timer.daemon = True
        timer.start()

    def unary_unary(self, *args, **kwargs):
        return _Follower(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args, **kwargs):
        return _Follower(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args, **kwargs):
        return _Follower(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args, **kwargs):
        return _Follower(self, "stream_stream", args, kwargs)

    def subscribe(self, callback, try_to_connect=False):
        self.current.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self.current.unsubscribe(callback)

    def close(self):
        self._closed = True
        self.current.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@dataclass(frozen=True)
class RenewingTransport(Transport):
    """A Transport whose channels and server credentials follow `credentials` (see the module's doc)."""

    credentials: Credentials | None = field(default=None, compare=False)

    @classmethod
    def following(cls, credentials: Credentials) -> RenewingTransport:
        base = credentials.transport()
        return cls(base.ca, base.cert, base.key, base.token, base.server_name, credentials)

    def channel(self, address: str, options: tuple = CHANNEL_OPTIONS) -> grpc.Channel:
        channel = SwappableChannel(self.credentials.transport().channel(address, options))
        self.credentials.follow(channel, address, options)
        return channel

    def server_credentials(self) -> grpc.ServerCredentials:
        return self.credentials.server_credentials()
