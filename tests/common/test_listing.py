"""Signed listings: the canonical bytes cover every field, and an edge's checks (signature, id,
expiry, version order) refuse what they should and nothing else."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import listing as listings
from common.files import portfolio_id
from common.security import Signer, Verifier
from protos import portfolio_pb2

NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
SIGNER, VERIFIER = Signer(KEY), Verifier(KEY.public_key())


def _member(n: int) -> portfolio_pb2.VariantInfo:
    vid = f"{n:064x}"
    return portfolio_pb2.VariantInfo(
        variant_id=vid,
        sha256=vid,
        size_bytes=1000 + n,
        params=500 + n,
        accuracy=0.9 - n / 100,
        method="shifter",
        name=f"vgg11-L{n}",
        arch="vgg11",
        sparsity=0.5,
        compression=2.0,
        latency_ms_b1=1.5 + n,
        level=n,
        params_ratio=2.0,
        signature=SIGNER.sign(vid),
        onnx_id=f"{n + 100:064x}",
        onnx_size_bytes=2000 + n,
        onnx_signature=SIGNER.sign(f"{n + 100:064x}"),
        precision="float32",
        parent_id="",
    )


def _listing(version: int = 5, expires_at: int = NOW + 3600, members=(1, 2)) -> portfolio_pb2.ListVariantsResponse:
    variants = [_member(n) for n in members]
    base = portfolio_pb2.ListVariantsResponse(
        variants=variants, portfolio_id=portfolio_id(v.variant_id for v in variants)
    )
    return listings.signed(base, version, expires_at, SIGNER)


NOTHING_HELD = listings.Accepted()


def _problem(listing, held=NOTHING_HELD, now=NOW):
    found = listings.problem(listing, VERIFIER, now, held)
    return found.reason if found else None


def test_the_member_fields_are_every_field_of_a_variant():
    assert set(listings.MEMBER_FIELDS) == {f.name for f in portfolio_pb2.VariantInfo.DESCRIPTOR.fields}
    assert len(set(listings.MEMBER_FIELDS)) == len(listings.MEMBER_FIELDS)


def test_the_bytes_are_deterministic_and_a_signed_listing_is_accepted():
    one, two = _listing(), _listing()
    assert listings.canonical(one) == listings.canonical(two) and one.signature == two.signature
    assert listings.canonical(one).startswith(listings.TAG) and _problem(one) is None
    assert listings.signed(one, 5, NOW + 3600, None).signature == b""  # no key: unsigned


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return value + (b"x" if isinstance(value, bytes) else "x")


@pytest.mark.parametrize("field", listings.MEMBER_FIELDS)
def test_changing_any_field_of_any_member_breaks_the_signature(field):
    for index in (0, 1):
        listing = _listing()
        member = listing.variants[index]
        setattr(member, field, _changed(getattr(member, field)))
        assert _problem(listing) == listings.BAD_SIGNATURE, (field, index)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda listing: setattr(listing, "version", listing.version + 1),
        lambda listing: setattr(listing, "expires_at_unix", listing.expires_at_unix + 86400),
        lambda listing: setattr(listing, "portfolio_id", "0" * 16),
        lambda listing: listing.variants.pop(),
        lambda listing: listing.variants.add().CopyFrom(_member(3)),
        lambda listing: listing.variants.reverse(),
    ],
)
def test_changing_the_listing_itself_breaks_the_signature(tamper):
    listing = _listing()
    tamper(listing)
    assert _problem(listing) == listings.BAD_SIGNATURE


def test_unsigned_foreign_and_mismatched_listings_are_refused():
    listing = _listing()
    listing.signature = b""
    assert _problem(listing) == listings.UNSIGNED
    other = Signer(Ed25519PrivateKey.generate())
    assert _problem(listings.signed(_listing(), 5, NOW + 3600, other)) == listings.BAD_SIGNATURE
    lying = _listing()
    lying.portfolio_id = "f" * 16  # signed as it is by the key, but not the id its members make
    assert _problem(listings.signed(lying, 5, NOW + 3600, SIGNER)) == listings.MISMATCH


def test_expiry_is_checked_by_the_wall_clock_with_the_stated_skew():
    listing = _listing(expires_at=NOW)
    assert _problem(listing, now=NOW + listings.SKEW_S) is None
    assert _problem(listing, now=NOW + listings.SKEW_S + 1) == listings.EXPIRED


def test_versions_only_rise_and_one_version_is_one_listing():
    held = _listing(version=5)
    accepted = listings.Accepted(5, listings.digest(held))
    assert _problem(_listing(version=4), accepted) == listings.OLDER
    assert _problem(_listing(version=5), accepted) is None  # sent again: the same bytes
    assert _problem(_listing(version=5, members=(1,)), accepted) == listings.REPLACED
    assert _problem(_listing(version=6, members=(1,)), accepted) is None  # an operator's rollback: a new version


def test_a_listing_signature_is_not_a_variant_signature():
    listing = _listing()
    with pytest.raises(Exception, match="wrong signature"):
        VERIFIER.check(listing.variants[0].variant_id, listing.signature)
    assert not VERIFIER.verifies(bytes.fromhex(listing.variants[0].variant_id), listing.signature)
