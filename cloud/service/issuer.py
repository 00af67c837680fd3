"""The fleet's certificate authority: certificates built for an identity and a public key, and CSRs checked.

Shared by `prunefleet certs` (`cloud.admin.certs`, which makes the key too) and the cloud's enrolment
service (`cloud.service.enrolment`, which only ever sees an edge's public key). Every certificate names
its holder with one `spiffe://prunefleet/ROLE[/NAME]` URI SAN (`common.identity`) and carries only its
role's extended key usages: the cloud serverAuth (its hosts and `CLOUD_NAME` as DNS/IP names), an edge
serverAuth and clientAuth (its hosts), the operator and clients clientAuth only. `not_valid_before` is
set `ISSUE_SKEW_S` before issue, which the revocation list relies on (`cloud.service.revocations`).

A CSR is read for two things only, its public key and the name in its subject's common name: the
cloud builds the certificate itself, so nothing else a CSR asks for (other names, key usages, a CA
flag) ever reaches a certificate. Its key must be P-256, P-384 or RSA of 2048 to 4096 bits, it must be
signed by that key, and the PEM is bounded (`MAX_CSR_BYTES`).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.service.revocations import ISSUE_SKEW_S
from common.edge_input import edge_name_problem
from common.errors import PrunefleetError
from common.identity import CLOUD_NAME, Identity
from common.security import CA, SecurityError, read_secret

SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
USAGES = {"cloud": (SERVER,), "edge": (SERVER, CLIENT), "operator": (CLIENT,), "client": (CLIENT,)}
MAX_CSR_BYTES = 8 << 10
CURVES = (ec.SECP256R1, ec.SECP384R1)
RSA_BITS = (2048, 4096)


class CsrError(PrunefleetError, ValueError):
    """A CSR the cloud does not sign; the message names the problem."""


def subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prunefleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(identity: Identity, hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def builder(name: x509.Name, issuer: x509.Name, public_key, lifetime_s: float) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=ISSUE_SKEW_S))
        .not_valid_after(now + datetime.timedelta(seconds=lifetime_s))
    )


def key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def certificate(
    ca_key, ca_cert: x509.Certificate, identity: Identity, public_key, hosts: Sequence[str], lifetime_s: float
) -> x509.Certificate:
    """A certificate for `public_key` naming `identity`, with its role's key usages; `hosts` as DNS/IP
    names (servers only; the cloud's always with `CLOUD_NAME`)."""
    if identity.role == "cloud":
        hosts = (*hosts, CLOUD_NAME)
    return (
        builder(subject(identity.uri), ca_cert.subject, public_key, lifetime_s)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(_alt_names(identity, hosts if SERVER in USAGES[identity.role] else ()), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(USAGES[identity.role])), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class Authority:
    """The CA's key and certificate, as the cloud's enrolment service holds them."""

    key: object
    cert: x509.Certificate

    @classmethod
    def load(cls, directory: Path) -> Authority:
        """From the `ca` directory of `prunefleet certs init` (ca.key, ca.pem)."""
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key(read_secret(directory / "ca.key"), None)
            cert = x509.load_pem_x509_certificate(read_secret(directory / CA))
        except ValueError as err:
            raise SecurityError(f"{directory} holds no usable CA: {err}") from None
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def edge_certificate(self, name: str, public_key, hosts: Sequence[str], lifetime_s: float) -> bytes:
        """A PEM certificate for edge `name` holding `public_key`."""
        cert = certificate(self.key, self.cert, Identity("edge", name), public_key, hosts, lifetime_s)
        return cert.public_bytes(serialization.Encoding.PEM)


def _key_problem(public_key) -> str | None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, CURVES):
            return None
        return f"an elliptic-curve key must be P-256 or P-384, not {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        if RSA_BITS[0] <= public_key.key_size <= RSA_BITS[1]:
            return None
        return f"an RSA key must have {RSA_BITS[0]} to {RSA_BITS[1]} bits, not {public_key.key_size}"
    return f"the key must be P-256, P-384 or RSA, not {type(public_key).__name__}"


def read_csr(pem: bytes) -> tuple[str, object]:
    """(the edge name in the CSR's common name, its public key); CsrError names what is wrong."""
    if not pem or len(pem) > MAX_CSR_BYTES:
        raise CsrError(f"the CSR must be a PEM of 1 to {MAX_CSR_BYTES} bytes, got {len(pem)}")
    try:
        csr = x509.load_pem_x509_csr(pem)
        signed = csr.is_signature_valid
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        public_key = csr.public_key()
    except (ValueError, TypeError) as err:
        raise CsrError(f"the CSR does not parse: {str(err)[:200]}") from None
    if not signed:
        raise CsrError("the CSR is not signed by the key it holds")
    if problem := _key_problem(public_key):
        raise CsrError(problem)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CsrError("the CSR's subject must hold exactly one common name: the edge's name")
    name = names[0].value
    if problem := edge_name_problem(name):
        raise CsrError(f"the CSR's common name: {problem}")
    return name, public_key


def key_fingerprint(public_key) -> str:
    """The sha256 of a public key's DER form: which key a request was made with."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()
