"""The edge's listing guard: the newest accepted version kept on disk across a restart, refusals
counted by reason, and no checks at all without a verify key."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import listing as listings
from common.files import portfolio_id
from common.security import Signer, Verifier
from edge.listing_guard import STATE_NAME, ListingGuard, ListingStateError, load_accepted, registered_listing
from protos import coordinator_pb2, portfolio_pb2

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def _listing(version: int, members: int = 2) -> portfolio_pb2.ListVariantsResponse:
    variants = [portfolio_pb2.VariantInfo(variant_id=f"{n:064x}", accuracy=0.9) for n in range(members)]
    base = portfolio_pb2.ListVariantsResponse(
        variants=variants, portfolio_id=portfolio_id(f"{n:064x}" for n in range(members))
    )
    return listings.signed(base, version, int(NOW) + 3600, Signer(KEY))


def _guard(cache, refused=None):
    return ListingGuard(Verifier(KEY.public_key()), cache, refused, wall_clock=lambda: NOW)


def test_the_newest_version_survives_a_restart_so_an_older_one_is_refused_after_it(tmp_path):
    refused = []
    guard = _guard(tmp_path, refused.append)
    assert guard.admit(_listing(5)) and load_accepted(tmp_path / STATE_NAME).version == 5
    written = (tmp_path / STATE_NAME).stat().st_mtime_ns
    again = _guard(tmp_path, refused.append)  # a restarted edge
    assert again.accepted == guard.accepted
    assert again.admit(_listing(5))  # the cloud sending the same listing again
    assert (tmp_path / STATE_NAME).stat().st_mtime_ns == written  # nothing new to store
    assert not again.admit(_listing(4)) and not again.admit(_listing(5, members=1))
    assert refused == [listings.OLDER, listings.REPLACED] and again.accepted.version == 5
    assert again.admit(_listing(6, members=1)) and load_accepted(tmp_path / STATE_NAME).version == 6


def test_a_register_reply_without_a_signed_listing_is_refused(tmp_path):
    old_cloud = coordinator_pb2.RegisterResponse(variants=_listing(1).variants, portfolio_id=_listing(1).portfolio_id)
    assert not registered_listing(old_cloud).signature
    assert not _guard(tmp_path).admit(registered_listing(old_cloud))
    new_cloud = coordinator_pb2.RegisterResponse(portfolio=_listing(1))
    assert _guard(tmp_path).admit(registered_listing(new_cloud))


def test_without_a_verify_key_every_listing_is_taken_and_nothing_stored(tmp_path):
    guard = ListingGuard(None, tmp_path)
    assert guard.admit(portfolio_pb2.ListVariantsResponse(portfolio_id="p1")) and guard.admit(_listing(1))
    assert not (tmp_path / STATE_NAME).exists()


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": -1, "digest": ""}', b'{"version": "7"}', b"x" * 10_000])
def test_a_damaged_state_file_is_named_not_ignored(tmp_path, content):
    (tmp_path / STATE_NAME).write_bytes(content)
    with pytest.raises(ListingStateError, match=STATE_NAME):
        _guard(tmp_path)
