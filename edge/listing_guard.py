"""Which portfolio listings this edge takes: with the cloud's key, only signed, unexpired, never older.

Listings reach the edge in the Register reply and in `Connect` directives. With a verify key
(`--verify-key`), `ListingGuard.admit` takes a listing only if `common.listing.problem` finds nothing:
the cloud's signature over the whole listing (portfolio id, version, expiry, every member's fields, so
a changed accuracy or latency is refused), its expiry by this edge's wall clock (`SKEW_S` allowed),
and a version not below the newest accepted (the same version only as the same bytes). A refused
listing is logged with the reason and counted (`prunefleet_edge_listings_refused_total{reason}`),
and the edge keeps the portfolio it holds. The newest accepted version is kept in the cache directory,
written atomically, so a restarted edge cannot be taken back by a replay either:

    CACHE/.listing.json   {"version": N, "digest": "<sha256 of the listing's canonical bytes>"}

An edge takes a listing when it arrives; one that expires while held is served on (an edge cut off
from the cloud keeps serving), and the next listing from the cloud, issued afresh, replaces it.
Without a verify key (`--insecure` development) every listing is taken, as it always was.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import listing as listings
from common.errors import PrunefleetError
from common.files import atomic_write_json
from common.security import Verifier
from protos import coordinator_pb2, portfolio_pb2

log = logging.getLogger(__name__)
STATE_NAME = ".listing.json"
MAX_STATE_BYTES = 4096


class ListingStateError(PrunefleetError, ValueError):
    """The stored newest listing cannot be read; the message names the file."""


def registered_listing(reply: coordinator_pb2.RegisterResponse) -> portfolio_pb2.ListVariantsResponse:
    """The listing a Register reply carries: its signed one, else (a cloud before signed listings) its
    members and id, unsigned."""
    if reply.HasField("portfolio"):
        return reply.portfolio
    return portfolio_pb2.ListVariantsResponse(variants=reply.variants, portfolio_id=reply.portfolio_id)


def load_accepted(path: Path) -> listings.Accepted:
    """The newest listing accepted, as stored at `path` (none yet: version 0)."""
    fix = "remove it to accept the cloud's next listing"
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read(MAX_STATE_BYTES + 1))
    except FileNotFoundError:
        return listings.Accepted()
    except (OSError, ValueError) as err:
        raise ListingStateError(f"{path} cannot be read ({err}); {fix}") from None
    version, digest = (state.get("version"), state.get("digest")) if isinstance(state, dict) else (None, None)
    if type(version) is not int or version < 0 or not isinstance(digest, str) or len(digest) > 64:
        raise ListingStateError(f"{path} holds no listing version and digest; {fix}")
    return listings.Accepted(version, digest)


class ListingGuard:
    """The edge's check of every listing it is given, and the newest it accepted (see the module)."""

    def __init__(
        self,
        verifier: Verifier | None,
        cache_dir: Path,
        refused: Callable[[str], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        skew_s: float = listings.SKEW_S,
    ):
        self._verifier, self._path = verifier, Path(cache_dir) / STATE_NAME
        self._refused, self._wall_clock, self._skew_s = refused or (lambda reason: None), wall_clock, skew_s
        self._lock = threading.Lock()
        self.accepted = load_accepted(self._path) if verifier is not None else listings.Accepted()

    def admit(self, listing: portfolio_pb2.ListVariantsResponse) -> bool:
        """May this edge take `listing`? Refusals are logged and counted; an accepted listing of a newer
        version is stored as the newest before this returns."""
        if self._verifier is None:
            return True
        with self._lock:
            refusal = listings.problem(listing, self._verifier, self._wall_clock(), self.accepted, self._skew_s)
            if refusal is not None:
                self._refused(refusal.reason)
                log.error("listing refused (%s): %s; keeping the portfolio held", refusal.reason, refusal.message)
                return False
            if listing.version > self.accepted.version:
                accepted = listings.Accepted(listing.version, listings.digest(listing))
                atomic_write_json(self._path, {"version": accepted.version, "digest": accepted.digest})
                self.accepted = accepted
                log.info("listing v%d of portfolio %s accepted", listing.version, listing.portfolio_id)
        return True
