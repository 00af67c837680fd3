"""`prunefleet certs`: a private CA, a certificate per role and per edge, the operator token, the signing key.

    DIR/ca/ ca.pem ca.key signing.pub          the CA (keep ca.key offline; `certs issue` needs it, and a
                                               cloud that enrols or renews edges, `cloud serve --ca`)
    DIR/bootstrap/NAME/ token ca.pem signing.pub   a bootstrap token for one edge (`certs token`)
    DIR/cloud/ ca.pem cert.pem key.pem token signing.key    (later: revoked, enrolment.sqlite)
    DIR/operator/ ca.pem cert.pem key.pem token
    DIR/edges/NAME/ ca.pem cert.pem key.pem signing.pub      one per edge (`certs issue edge NAME`)
    DIR/clients/NAME/ ca.pem cert.pem key.pem                one per application calling Predict

`init` writes the CA, the cloud, the operator, the client `default` and the edge `edge` (a one-edge
setup needs nothing more); `issue` adds an edge or a client; `revoke` lists one in DIR/cloud/revoked
(`cloud.service.revocations`); `token`, `pending` and `approve` let edges enrol instead
(`cloud.service.enrolment`, `cloud.admin.certs_enrol`). Each directory is what `--certs` takes.
Roles cannot be confused (`common.identity`): each certificate carries its role and name as a URI SAN
and only the extended key usages its role needs: the cloud serverAuth only (its hosts, and `CLOUD_NAME`,
as DNS/IP names), an edge serverAuth and clientAuth (its hosts), the operator and clients clientAuth
only (`cloud.service.issuer` builds them). Edge and client certificates are short-lived (`EDGE_DAYS`);
reissue them before they expire, or let the cloud renew an edge's (`prunefleet cloud serve --ca`).
Keys are written 0600.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.admin import certs_enrol
from cloud.service import issuer
from common import security
from common.edge_input import edge_name_problem
from common.files import atomic_write_bytes
from common.identity import Identity

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CLOUD_DAYS, OPERATOR_DAYS, EDGE_DAYS = 825, 365, 7
USAGES = issuer.USAGES
SUBDIRS = {"edge": "edges", "client": "clients"}  # the roles with many holders: DIR/edges/NAME, DIR/clients/NAME


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name: str = "prunefleet CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        issuer.builder(issuer.subject(name), issuer.subject(name), key.public_key(), days * 86400.0)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(issuer.key_usage(ca=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key, ca_cert: x509.Certificate, identity: Identity, hosts: Sequence[str] = (), days: float = EDGE_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate naming `identity` with its role's key usages (`cloud.service.issuer`);
    `hosts` as DNS/IP names (servers)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, issuer.certificate(ca_key, ca_cert, identity, key.public_key(), hosts, days * 86400.0)


def _write(path: Path, data: bytes, secret: bool) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600 if secret else 0o644)


def _write_holder(directory: Path, ca_pem: bytes, key, cert: x509.Certificate, extras: dict[str, bytes]) -> Path:
    _write(directory / security.CA, ca_pem, secret=False)
    _write(directory / security.CERT, _cert_pem(cert), secret=False)
    _write(directory / security.KEY, _key_pem(key), secret=True)
    for name, data in extras.items():
        _write(directory / name, data, secret=name != security.SIGNING_PUB)
    return directory


def init(directory: Path, hosts: Sequence[str] = (), force: bool = False) -> dict[str, Path]:
    """Write the CA, the cloud, the operator, the client `default` and the edge `edge`; refuses to
    overwrite unless `force`. Returns each directory by role ("cloud", "operator", "client", "edge")."""
    directory = Path(directory)
    if (directory / "ca" / "ca.pem").exists() and not force:
        raise security.SecurityError(f"{directory} already holds a CA; pass --force to replace every key in it")
    hosts = (*DEFAULT_HOSTS, *hosts)
    ca_key, ca_cert = make_ca()
    signing = Ed25519PrivateKey.generate()
    token = secrets.token_urlsafe(32).encode() + b"\n"
    _write(directory / "ca" / "ca.key", _key_pem(ca_key), secret=True)
    _write(directory / "ca" / security.CA, _cert_pem(ca_cert), secret=False)
    _write(directory / "ca" / security.SIGNING_PUB, security.Signer(signing).public_pem(), secret=False)
    ca_pem = _cert_pem(ca_cert)
    cloud = issue(ca_key, ca_cert, Identity("cloud"), hosts, days=CLOUD_DAYS)
    operator = issue(ca_key, ca_cert, Identity("operator", "operator"), days=OPERATOR_DAYS)
    written = {
        "cloud": _write_holder(
            directory / "cloud", ca_pem, *cloud, {security.TOKEN: token, security.SIGNING_KEY: _key_pem(signing)}
        ),
        "operator": _write_holder(directory / "operator", ca_pem, *operator, {security.TOKEN: token}),
    }
    written["client"] = issue_holder(directory, "client", "default")
    written["edge"] = issue_holder(directory, "edge", "edge", hosts)
    return written


def _load_ca(directory: Path):
    try:
        ca_key = serialization.load_pem_private_key(security.read_secret(directory / "ca" / "ca.key"), None)
        ca_cert = x509.load_pem_x509_certificate(security.read_secret(directory / "ca" / security.CA))
    except ValueError as err:
        raise security.SecurityError(f"{directory / 'ca'} holds no usable CA: {err}") from None
    return ca_key, ca_cert


def issue_pems(
    directory: Path, role: str, name: str, hosts: Sequence[str] = DEFAULT_HOSTS, days: float = EDGE_DAYS
) -> tuple[bytes, bytes, bytes]:
    """(CA, key, certificate) PEMs for one edge or client application, signed by the CA in `directory`."""
    if role not in SUBDIRS:
        raise security.SecurityError(f"certs issue makes 'edge' or 'client' certificates, not {role!r}")
    if problem := edge_name_problem(name):
        raise security.SecurityError(problem.replace("edge name", f"{role} name"))
    if not 0 < days <= 3650:
        raise security.SecurityError(f"days must be in (0, 3650], got {days}")
    ca_key, ca_cert = _load_ca(Path(directory))
    key, cert = issue(ca_key, ca_cert, Identity(role, name), hosts, days)
    return _cert_pem(ca_cert), _key_pem(key), _cert_pem(cert)


def issue_holder(
    directory: Path, role: str, name: str, hosts: Sequence[str] = DEFAULT_HOSTS, days: float = EDGE_DAYS
) -> Path:
    """`certs issue edge|client NAME`: `issue_pems` written to DIR/edges/NAME or DIR/clients/NAME (an
    edge's with the signing key's public half), replacing what was there."""
    directory = Path(directory)
    ca_pem, key_pem, cert_pem = issue_pems(directory, role, name, hosts, days)
    holder = directory / SUBDIRS[role] / name
    _write(holder / security.CA, ca_pem, secret=False)
    _write(holder / security.CERT, cert_pem, secret=False)
    _write(holder / security.KEY, key_pem, secret=True)
    if role == "edge":
        _write(holder / security.SIGNING_PUB, security.read_secret(directory / "ca" / security.SIGNING_PUB), False)
    return holder


def revoke(directory: Path, role: str, name: str, now: float | None = None) -> Path:
    """`certs revoke edge|client NAME`: every certificate issued to it so far is refused by the cloud,
    which rereads DIR/cloud/revoked within seconds (copy that file to a cloud elsewhere). Returns it."""
    if role not in SUBDIRS or edge_name_problem(name):
        raise security.SecurityError(f"revoke an 'edge' or 'client' by a valid name, not {role!r} {name[:80]!r}")
    path = Path(directory) / "cloud" / "revoked"
    kept = path.read_bytes() if path.exists() else b""
    line = f"{Identity(role, name).uri} {time.time() if now is None else now:.3f}\n".encode()
    _write(path, kept + line, secret=False)
    return path


def command(args) -> int:
    """`prunefleet certs init|issue|revoke` (and `token|pending|approve`, `cloud.admin.certs_enrol`)."""
    if args.action in certs_enrol.ACTIONS:
        return certs_enrol.command(args)
    if args.action == "init":
        for role, path in init(args.dir, args.hosts, args.force).items():
            print(f"{role:9s} {path}")
        print(f"keep {args.dir / 'ca' / 'ca.key'} offline; give each process its own directory with --certs")
        print("an edge per name: prunefleet certs issue edge NAME --certs-dir DIR")
        return 0
    if args.action == "revoke":
        print(f"revoked {args.role} {args.name}: {revoke(args.certs_dir, args.role, args.name)}")
        return 0
    path = issue_holder(args.certs_dir, args.role, args.name, (*DEFAULT_HOSTS, *args.hosts), args.days)
    print(f"{args.role} {args.name}: {path} (valid {args.days:g} days)")
    return 0
