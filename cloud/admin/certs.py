"""`prunefleet certs init DIR`: a private CA, one certificate per role, the operator token, the signing key.

    DIR/ca/ca.pem, ca.key                      the CA (keep ca.key offline; nothing at run time needs it)
    DIR/cloud/ ca.pem cert.pem key.pem token signing.key
    DIR/edge/  ca.pem cert.pem key.pem signing.pub
    DIR/operator/ ca.pem cert.pem key.pem token

Each role's directory is what `--certs` takes on `prunefleet cloud serve`, `prunefleet-edge run` and
the operator commands. Cloud and edge certificates name every `--host` (plus localhost and 127.0.0.1)
so clients can check them; every certificate may act as client and server. Keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import security
from common.files import atomic_write_bytes

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
ROLES = ("cloud", "edge", "operator")


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prunefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(name: str = "prunefleet CA", days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(name), _name(name), key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key, ca_cert: x509.Certificate, role: str, hosts: Sequence[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for `role` (its common name) valid as TLS server and client for `hosts`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(role), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_alt_names(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, secret: bool) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600 if secret else 0o644)


def init(directory: Path, hosts: Sequence[str] = (), force: bool = False) -> dict[str, Path]:
    """Write the CA and the three role directories; refuses to overwrite unless `force`."""
    directory = Path(directory)
    if (directory / "ca" / "ca.pem").exists() and not force:
        raise security.SecurityError(f"{directory} already holds a CA; pass --force to replace every key in it")
    hosts = (*DEFAULT_HOSTS, *hosts)
    ca_key, ca_cert = make_ca()
    _write(directory / "ca" / "ca.key", _key_pem(ca_key), secret=True)
    _write(directory / "ca" / security.CA, _cert_pem(ca_cert), secret=False)
    signing = Ed25519PrivateKey.generate()
    token = secrets.token_urlsafe(32).encode() + b"\n"
    extras = {
        "cloud": {security.TOKEN: token, security.SIGNING_KEY: _key_pem(signing)},
        "edge": {security.SIGNING_PUB: security.Signer(signing).public_pem()},
        "operator": {security.TOKEN: token},
    }
    for role in ROLES:
        key, cert = issue(ca_key, ca_cert, role, hosts)
        role_dir = directory / role
        _write(role_dir / security.CA, _cert_pem(ca_cert), secret=False)
        _write(role_dir / security.CERT, _cert_pem(cert), secret=False)
        _write(role_dir / security.KEY, _key_pem(key), secret=True)
        for name, data in extras[role].items():
            _write(role_dir / name, data, secret=name != security.SIGNING_PUB)
    return {role: directory / role for role in ROLES}
