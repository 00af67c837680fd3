"""Signed portfolio listings: the bytes the cloud signs and the edge checks, and the edge's checks.

A listing (`ListVariantsResponse`) is signed as a whole: its portfolio id, its `version` (rising with
every listing the cloud issues), its expiry (`expires_at_unix`) and every field of every member, in
the order listed (`canonical`). Cloud and edge build the bytes here, so they sign and check the same.

    canonical = TAG
              | str portfolio_id | u64 version | i64 expires_at_unix | u32 member count
              | per member, per field of MEMBER_FIELDS in order: u16 field number | value
    value     = str: u32 length + UTF-8 | bytes: u32 length + raw | int: i64 | float: IEEE 754 binary64,
                everything big-endian

An edge holding the cloud's key accepts a listing (`problem` is None) only when it is signed by that
key, its portfolio id is the one its members make, it has not expired by the edge's wall clock (with
`SKEW_S` for clocks that disagree), and it is not older than the newest listing the edge accepted
(`Accepted`): a lower version is a replay; the same version is accepted only with the same bytes (the
cloud sending again what it sent), never another listing under it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from common.files import portfolio_id, short_id
from common.security import Signer, Verifier
from protos import portfolio_pb2

TAG = b"prunefleet signed listing v1\n"
SKEW_S = 300.0  # how far the edge's clock may be behind the cloud's before a fresh listing reads as expired
MEMBER_FIELDS = (  # every field of VariantInfo: the test keeps this the whole message
    "variant_id",
    "sha256",
    "size_bytes",
    "params",
    "accuracy",
    "method",
    "name",
    "arch",
    "sparsity",
    "compression",
    "latency_ms_b1",
    "level",
    "params_ratio",
    "signature",
    "onnx_id",
    "onnx_size_bytes",
    "onnx_signature",
    "precision",
    "parent_id",
)
_NUMBERS = {f.name: f.number for f in portfolio_pb2.VariantInfo.DESCRIPTOR.fields}
# why a listing is refused: the reasons an edge counts refusals by
UNSIGNED, BAD_SIGNATURE, MISMATCH, EXPIRED, OLDER, REPLACED = (
    "unsigned",
    "bad_signature",
    "id_mismatch",
    "expired",
    "older_version",
    "same_version_other_listing",
)


def _value(value) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return struct.pack(">I", len(value)) + value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"no canonical form for {type(value).__name__}")
    return struct.pack(">q", value) if isinstance(value, int) else struct.pack(">d", value)


def canonical(listing: portfolio_pb2.ListVariantsResponse) -> bytes:
    """The bytes a listing's signature covers (everything but the signature itself), as the module says."""
    parts = [
        TAG,
        _value(listing.portfolio_id),
        struct.pack(">Qq", listing.version, listing.expires_at_unix),
        struct.pack(">I", len(listing.variants)),
    ]
    for member in listing.variants:
        for name in MEMBER_FIELDS:
            parts.append(struct.pack(">H", _NUMBERS[name]) + _value(getattr(member, name)))
    return b"".join(parts)


def digest(listing: portfolio_pb2.ListVariantsResponse) -> str:
    """The sha256 (hex) of a listing's canonical bytes: what tells two listings of one version apart."""
    return hashlib.sha256(canonical(listing)).hexdigest()


def signed(
    listing: portfolio_pb2.ListVariantsResponse, version: int, expires_at_unix: int, signer: Signer | None
) -> portfolio_pb2.ListVariantsResponse:
    """A copy of `listing` under `version` and the expiry, signed when there is a signer."""
    out = portfolio_pb2.ListVariantsResponse()
    out.CopyFrom(listing)
    out.version, out.expires_at_unix, out.signature = version, expires_at_unix, b""
    if signer is not None:
        out.signature = signer.sign_message(canonical(out))
    return out


@dataclass(frozen=True)
class Accepted:
    """The newest listing an edge accepted: its version and the digest of its canonical bytes."""

    version: int = 0
    digest: str = ""


@dataclass(frozen=True)
class Refusal:
    """Why a listing is refused: `reason` (one of the module's reasons, a metric label) and the words."""

    reason: str
    message: str


def _name(listing: portfolio_pb2.ListVariantsResponse) -> str:
    return f"listing v{listing.version} of portfolio {short_id(listing.portfolio_id) or '(none)'}"


def problem(
    listing: portfolio_pb2.ListVariantsResponse, verifier: Verifier, now: float, held: Accepted, skew_s: float = SKEW_S
) -> Refusal | None:
    """Why an edge with the cloud's key must refuse `listing` at wall-clock time `now`, holding `held`;
    None when it may accept it."""
    name = _name(listing)
    if not listing.signature:
        return Refusal(UNSIGNED, f"{name} is unsigned")
    if not verifier.verifies(canonical(listing), listing.signature):
        return Refusal(BAD_SIGNATURE, f"{name} does not carry the cloud's signature over what it lists")
    members = portfolio_id(v.variant_id for v in listing.variants)
    if listing.portfolio_id != members:
        return Refusal(MISMATCH, f"{name} names portfolio {listing.portfolio_id[:40]!r}; its members make {members}")
    if now > listing.expires_at_unix + skew_s:
        late = now - listing.expires_at_unix
        return Refusal(EXPIRED, f"{name} expired {late:.0f} s ago (at unix {listing.expires_at_unix})")
    if listing.version < held.version:
        return Refusal(OLDER, f"{name} is older than v{held.version}, the newest this edge accepted")
    if listing.version == held.version and digest(listing) != held.digest:
        return Refusal(REPLACED, f"{name} differs from the v{held.version} listing this edge accepted")
    return None
