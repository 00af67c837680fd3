"""Transport security and variant signatures, shared by the cloud, the edge and the operator CLI.

Every process speaks gRPC either with mutual TLS (its own certificate and key, and the CA that signed
every peer's) or, only when asked for with `--insecure`, in plaintext. A role directory written by
`prunefleet certs init` holds what one role needs:

    ca.pem  cert.pem  key.pem     every role: the CA, this role's certificate and private key
    token                         cloud and operator: the bearer token of operator RPCs
    signing.key                   cloud: Ed25519 private key that signs variants and listings
    signing.pub                   edge: the matching public key; unsigned or wrongly signed variants and
                                  listings are refused

Operator RPCs carry `authorization: Bearer TOKEN` metadata (`BearerToken` adds it to a channel); the
server's check, in constant time, is `common.token_check`.
A variant's signature is Ed25519 over the 32-byte sha256 digest of its file (its id); a listing's is
Ed25519 over its canonical bytes (`common.listing`), which are longer and start with their own tag, so
neither can pass as the other.

Every certificate names its role and holder (`common.identity`). A channel from an edge or operator
certificate expects the cloud's certificate (`CLOUD_NAME`, gRPC's target-name override), so no other
certificate of the CA passes as the cloud; a client certificate's channel checks the edge's host name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from common.errors import PrunefleetError
from common.files import is_sha256_hex, short_id
from common.identity import CLOUD_NAME, Identity, certificate_identity
from common.wire import CHANNEL_OPTIONS

CA, CERT, KEY, TOKEN, SIGNING_KEY, SIGNING_PUB = "ca.pem", "cert.pem", "key.pem", "token", "signing.key", "signing.pub"
MAX_SECRET_BYTES = 64 << 10
MIN_TOKEN_CHARS = 16
AUTHORIZATION = "authorization"


class SecurityError(PrunefleetError, ValueError):
    """Missing or unusable certificates, keys or tokens; the message says what to do."""


def read_secret(path: Path) -> bytes:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SECRET_BYTES:
            raise SecurityError(f"{path} is larger than {MAX_SECRET_BYTES} bytes; not a key or certificate")
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(
            f"{path} does not exist; create certificates with 'prunefleet certs init DIR' "
            "or pass --insecure for plaintext"
        ) from None


def read_token(path: Path) -> str:
    token = read_secret(path).decode("ascii", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise SecurityError(f"{path}: a token is at least {MIN_TOKEN_CHARS} printable characters without spaces")
    return token


@dataclass(frozen=True)
class Transport:
    """How one process speaks gRPC. Empty `cert` means plaintext (only built by `plaintext()`)."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    token: str = ""  # client: sent with every call; server: required on operator RPCs ("" = not required)
    server_name: str = ""  # the name the server's certificate must carry ("" = the address's host)

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key) or bool(self.cert) != bool(self.ca):
            raise SecurityError("TLS needs the CA, a certificate and its key together")

    @classmethod
    def plaintext(cls, token: str = "") -> Transport:
        return cls(token=token)

    @classmethod
    def load(cls, directory: Path, token: bool = False) -> Transport:
        """From a role directory; `token` also reads its token file."""
        directory = Path(directory)
        return cls.holding(
            read_secret(directory / CA),
            read_secret(directory / CERT),
            read_secret(directory / KEY),
            read_token(directory / TOKEN) if token else "",
        )

    @classmethod
    def holding(cls, ca: bytes, cert: bytes, key: bytes, token: str = "") -> Transport:
        """TLS with this certificate. An edge's or the operator's channels talk to the cloud, so they
        accept only the cloud's certificate (`CLOUD_NAME`); a client's check the host they call."""
        identity = certificate_identity(cert)
        talks_to_cloud = identity is not None and identity.role in ("edge", "operator")
        return cls(ca, cert, key, token, CLOUD_NAME if talks_to_cloud else "")

    @property
    def identity(self) -> Identity | None:
        """Whom this transport's certificate names (None in plaintext)."""
        return None if self.insecure else certificate_identity(self.cert)

    def for_edges(self) -> Transport:
        """This transport as a caller of edges' InferenceService: never the operator token (an edge must
        not get it), and the edge's certificate is checked against the host called, not `CLOUD_NAME`."""
        return replace(self, token="", server_name="")

    @property
    def insecure(self) -> bool:
        return not self.cert

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS that refuses any client without a certificate from our CA (checked in the handshake)."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def bind(self, server: grpc.Server, address: str) -> int:
        """Add a listening port; 0 when it cannot be bound."""
        try:
            if self.insecure:
                return server.add_insecure_port(address)
            return server.add_secure_port(address, self.server_credentials())
        except RuntimeError:  # grpc raises when the address is taken
            return 0

    def name_options(self) -> tuple:
        """The channel option that makes the server's certificate be checked against `server_name`."""
        return (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()

    def channel(self, address: str, options: tuple = CHANNEL_OPTIONS) -> grpc.Channel:
        if self.insecure:
            channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
            )
            channel = grpc.secure_channel(address, credentials, options=(*options, *self.name_options()))
        if self.token:
            channel = grpc.intercept_channel(channel, BearerToken(self.token))
        return channel


# --- bearer token ---------------------------------------------------------------------------------------
class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call of a channel."""

    def __init__(self, token: str):
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


# --- variant signatures ---------------------------------------------------------------------------------
def _digest(variant_id: str) -> bytes:
    if not is_sha256_hex(variant_id):
        raise SecurityError(f"variant id {variant_id[:80]!r} is not a sha256 hex string")
    return bytes.fromhex(variant_id)


class Signer:
    """The cloud's side: signs variant ids (sha256 digests) with its Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def load(cls, path: Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(read_secret(path), password=None)
        except ValueError as err:
            raise SecurityError(f"{path} is not a PEM private key: {err}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SecurityError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, variant_id: str) -> bytes:
        return self._key.sign(_digest(variant_id))

    def sign_message(self, message: bytes) -> bytes:
        """A signature over `message` (a signed listing's canonical bytes, `common.listing`)."""
        return self._key.sign(message)

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class Verifier:
    """The edge's side: a variant is accepted only with a valid signature over its id."""

    def __init__(self, key: Ed25519PublicKey):
        self._key = key

    @classmethod
    def load(cls, path: Path) -> Verifier:
        try:
            key = serialization.load_pem_public_key(read_secret(path))
        except ValueError as err:
            raise SecurityError(f"{path} is not a PEM public key: {err}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SecurityError(f"{path} is not an Ed25519 public key")
        return cls(key)

    def check(self, variant_id: str, signature: bytes) -> None:
        """Raise SecurityError unless `signature` is the cloud's over `variant_id`."""
        if not signature:
            raise SecurityError(f"variant {short_id(variant_id)} is unsigned")
        try:
            self._key.verify(signature, _digest(variant_id))
        except InvalidSignature:
            raise SecurityError(f"variant {short_id(variant_id)} has a wrong signature") from None

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """Is `signature` the cloud's over `message` (a listing's canonical bytes, `common.listing`)?"""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


# --- command-line flags, the same on every command ----------------------------------------------------
CERTS_ENV = "PRUNEFLEET_CERTS"


def add_arguments(parser, token: bool, environ=None) -> None:
    """`--certs DIR` (default from $PRUNEFLEET_CERTS, read by the caller's main), `--insecure` and, for
    commands that carry or check the operator token, `--token-file`."""
    default = (environ or {}).get(CERTS_ENV) or None
    parser.add_argument(
        "--certs",
        type=Path,
        default=default,
        metavar="DIR",
        help=f"this role's directory from 'prunefleet certs init' (default ${CERTS_ENV})",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC, no certificates (local use only)")
    if token:
        parser.add_argument(
            "--token-file",
            type=Path,
            default=None,
            help="operator token (default: DIR/token; with --insecure, no token unless given)",
        )


def from_arguments(args, token: bool) -> Transport:
    """The transport the flags ask for; plaintext only with --insecure."""
    token_file = getattr(args, "token_file", None) if token else None
    if args.insecure:
        return Transport.plaintext(read_token(token_file) if token_file else "")
    if args.certs is None:
        raise SecurityError(
            f"pass --certs DIR (made by 'prunefleet certs init'; or set ${CERTS_ENV}) or --insecure for plaintext"
        )
    transport = Transport.load(args.certs)
    if token:
        path = token_file or Path(args.certs) / TOKEN
        transport = replace(transport, token=read_token(path))
    return transport
