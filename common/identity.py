"""Who holds a certificate: the roles of the fleet and how a certificate names its holder.

Every certificate of `prunefleet certs` carries one SPIFFE-style URI SAN, `spiffe://prunefleet/ROLE[/NAME]`:
the cloud (`spiffe://prunefleet/cloud`, TLS server only, and the DNS name `CLOUD_NAME`), each edge
(`.../edge/NAME`: client to the cloud, server of its InferenceService), the operator and each client
application (`.../operator/NAME`, `.../client/NAME`: TLS client only). Channels to the cloud expect
`CLOUD_NAME` in the server's certificate (`common.security.Transport`); servers read the caller's
identity from the handshake with `peer_identity`. Apart from `common.security` so that it stays one
small thing: naming, not transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

TRUST_DOMAIN = "spiffe://prunefleet/"
ROLES = ("cloud", "edge", "operator", "client")
CLOUD_NAME = "cloud.prunefleet"  # DNS SAN only the cloud's certificate carries; channels to the cloud expect it


@dataclass(frozen=True)
class Identity:
    """Who holds a certificate: its role and, but for the cloud, its name."""

    role: str
    name: str = ""

    @property
    def uri(self) -> str:
        return TRUST_DOMAIN + self.role + (f"/{self.name}" if self.name else "")

    @classmethod
    def parse(cls, uri: str) -> Identity | None:
        """The identity a URI SAN names, or None when it names none of ours."""
        if not uri.startswith(TRUST_DOMAIN):
            return None
        role, _, name = uri[len(TRUST_DOMAIN) :].partition("/")
        if role not in ROLES or (role == "cloud") != (not name) or "/" in name:
            return None
        return cls(role, name)


def certificate_identity(cert_pem: bytes) -> Identity | None:
    """The identity in a PEM certificate's URI SAN (None: a certificate from before roles, or not ours)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = {i for i in map(Identity.parse, uris) if i is not None}
    return found.pop() if len(found) == 1 else None


def peer_identity(context) -> Identity | None:
    """The caller's identity from a server's `context.auth_context()` (mutual TLS); None in plaintext
    or when its certificate names no single identity of ours."""
    sans = context.auth_context().get("x509_subject_alternative_name") or ()
    found = {i for i in (Identity.parse(v.decode(errors="replace")) for v in sans) if i is not None}
    return found.pop() if len(found) == 1 else None
