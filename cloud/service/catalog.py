"""Every portfolio the cloud serves: the one it started with and every one deployed since.

Portfolios are recorded in the fleet database (id -> store directory), so a restarted cloud still
serves the variants its edges were told to hold, once each store is hashed again. A store is checked
before it is added (`cloud.service.store_checks`): no symlink in it, bounded sizes, every file
hashing to its id with its recorded size, and the portfolio id computed from the members, since the
cloud signs what it serves and edges hold portfolios by id.

Listings go out signed as a whole (`common.listing`) under the cloud's current listing version and
expiry, both in the fleet database: `issue` moves to the next version (every deploy, promotion,
rollback and refresh, in the same durable transaction as the change it announces; one above the last
and at least the unix second, so it rises even past a lost database) with a new expiry `validity_s`
ahead; `due` says when half of that has passed and the listings must be issued again, so a connected
edge never holds an expired one. A cloud issues a new version when it starts: what it lists under
the version stored may have changed while it was down (another signing key, a store withdrawn), and
an edge refuses other bytes under a version it already accepted.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

from cloud.build.store import Manifest, PortfolioStore, StoreError, VariantEntry
from cloud.service.fleet_db import FleetDB
from cloud.service.fleet_schema import LISTING_EXPIRES, LISTING_VERSION, issue_statements
from cloud.service.store_checks import Progress, StoreLimits, check_files, read_manifest, served_id
from common import listing as listings
from common.security import Signer
from protos import portfolio_pb2

log = logging.getLogger(__name__)
CURRENT = "portfolio"  # settings key: the portfolio new edges get
LIMITS = StoreLimits()
VALIDITY_S = 7 * 86400.0  # how long a listing is valid (`prunefleet cloud serve --listing-validity`)
MIN_VALIDITY_S, MAX_VALIDITY_S = 600.0, 366 * 86400.0


def _check_validity(validity_s: float) -> None:
    if not MIN_VALIDITY_S <= validity_s <= MAX_VALIDITY_S:
        raise ValueError(f"listing validity must be in [{MIN_VALIDITY_S:g}, {MAX_VALIDITY_S:g}] s, got {validity_s}")


def variant_info(entry: VariantEntry, signer: Signer | None) -> portfolio_pb2.VariantInfo:
    """A member as the listing names it: its own file (the safetensors file of a float32 variant, the
    ONNX file of an int8 member) and its ONNX file, each with its size and the cloud's signature, and
    its precision and parent (`protos/portfolio.proto` says how the fields read for each kind)."""

    def sign(file_id: str | None) -> bytes:
        return signer.sign(file_id) if signer and file_id else b""

    return portfolio_pb2.VariantInfo(
        variant_id=entry.variant_id,
        sha256=entry.variant_id,
        size_bytes=entry.size_bytes,
        params=entry.params,
        accuracy=entry.accuracy,
        method=entry.method,
        name=entry.name,
        arch=entry.arch,
        sparsity=entry.sparsity,
        compression=entry.compression,
        latency_ms_b1=entry.latency_ms_b1,
        level=entry.level,
        params_ratio=entry.params_ratio,
        signature=sign(entry.variant_id),
        onnx_id=entry.onnx_id or "",
        onnx_size_bytes=entry.onnx_bytes or 0,
        onnx_signature=sign(entry.onnx_id),
        precision=entry.precision,
        parent_id=entry.parent or "",
    )


def check_store(
    store: PortfolioStore, limits: StoreLimits = LIMITS, progress: Progress | None = None, claimed: str = ""
) -> Manifest:
    """The portfolio as edges are served it (`Manifest.served`), under the id its members make, once
    every file of every member (variant files, ONNX files, int8 members) is a regular file in the store
    with the recorded size and hash (`cloud.service.store_checks`). `claimed`: the id it must make (a
    catalogued store's), else the one its manifest claims; either way a mismatch names both."""
    manifest = check_files(store, limits, progress)
    return replace(manifest.served(), portfolio_id=served_id(manifest, claimed))


class Catalog:
    """Every catalogued store is hashed again when the catalog is made (a restarted cloud): one whose
    files changed is not served, and stays in `withdrawn` with the reason (GetFleet reports it).
    Hashing holds no lock but the catalog's own, and that only to record what it found, so a deploy
    being hashed never holds up a rollback; `progress` hears of every MiB a deploy hashes."""

    def __init__(
        self,
        db: FleetDB,
        signer: Signer | None = None,
        limits: StoreLimits = LIMITS,
        progress: Progress | None = None,
        validity_s: float = VALIDITY_S,
    ):
        self._db, self._signer, self._limits, self._progress = db, signer, limits, progress
        self._lock = threading.Lock()
        self._manifests: dict[str, Manifest] = {}
        self._files: dict[str, tuple[VariantEntry, Path]] = {}
        self._listings: dict[str, portfolio_pb2.ListVariantsResponse] = {}
        self._withdrawn: dict[str, str] = {}  # portfolio id -> why it is no longer served
        self._signed: dict[str, portfolio_pb2.ListVariantsResponse] = {}  # under the current version
        _check_validity(validity_s)
        self.validity_s = validity_s
        self._epoch = self._read_epoch()
        self.issue()  # on every start (the module docstring says why), valid for the validity it starts with
        for portfolio_id, root in db.portfolios():
            try:
                store = PortfolioStore(Path(root))
                self._index(store, check_store(store, limits, claimed=portfolio_id))
            except StoreError as err:
                self._withdrawn[portfolio_id] = f"{root}: {err}"
                log.error("portfolio %s in %s is no longer served: %s", portfolio_id, root, err)

    def _index(self, store: PortfolioStore, manifest: Manifest) -> None:
        listing = portfolio_pb2.ListVariantsResponse(
            variants=[variant_info(v, self._signer) for v in manifest.variants], portfolio_id=manifest.portfolio_id
        )
        with self._lock:
            self._manifests[manifest.portfolio_id] = manifest
            self._listings[manifest.portfolio_id] = listing
            for entry in manifest.variants:  # each file by its id: the member's own, and its ONNX file
                self._files[entry.variant_id] = (entry, store.member_path(entry))
                if entry.onnx_id and entry.onnx_id != entry.variant_id:
                    self._files[entry.onnx_id] = (entry, store.onnx_path(entry.onnx_id))

    def add(self, root: Path) -> Manifest:
        """Check and record a store; its portfolio can be served and deployed from now on. A portfolio
        already served keeps its listing: the same members in another store are not hashed again, and
        what that store's manifest says of them is not taken (a listing changes only by a new id)."""
        store = PortfolioStore(Path(os.path.realpath(root)))
        claimed = served_id(read_manifest(store, self._limits))
        if self.known(claimed):
            return self.manifest(claimed)
        manifest = check_store(store, self._limits, self._progress)
        if not manifest.variants:
            raise StoreError(f"portfolio {manifest.portfolio_id} in {root} has no variants")
        self._index(store, manifest)
        self._db.add_portfolio(manifest.portfolio_id, str(store.root))
        with self._lock:
            self._withdrawn.pop(manifest.portfolio_id, None)
        return manifest

    def start_with(self, root: Path) -> None:
        """Add the store the cloud was started with; it becomes current unless a rollout chose another."""
        manifest = self.add(root)
        if not self.current() or self.current() not in self._manifests:
            self._db.set_setting(CURRENT, manifest.portfolio_id)

    def withdrawn(self) -> dict[str, str]:
        """The catalogued portfolios no longer served (their files changed since), each with why."""
        with self._lock:
            return dict(self._withdrawn)

    def current(self) -> str:
        return self._db.setting(CURRENT)

    def set_current(self, portfolio_id: str) -> None:
        self._db.set_setting(CURRENT, portfolio_id)

    def known(self, portfolio_id: str) -> bool:
        with self._lock:
            return portfolio_id in self._manifests

    def manifest(self, portfolio_id: str = "") -> Manifest:
        with self._lock:
            manifest = self._manifests.get(portfolio_id or self._db.setting(CURRENT))
        if manifest is None:
            raise StoreError(f"portfolio {portfolio_id!r} is not known to this cloud")
        return manifest

    def listing(self, portfolio_id: str = "") -> portfolio_pb2.ListVariantsResponse:
        """The listing of a portfolio (default: the current one) under the current version and expiry,
        signed when the cloud has a key."""
        portfolio_id = portfolio_id or self.current()
        with self._lock:
            signed, listing, (version, expires_at) = (
                self._signed.get(portfolio_id),
                self._listings.get(portfolio_id),
                self._epoch,
            )
        if listing is None:
            raise StoreError(f"portfolio {portfolio_id!r} is not known to this cloud")
        if signed is None or signed.version != version:
            signed = listings.signed(listing, version, expires_at, self._signer)
            with self._lock:
                self._signed[portfolio_id] = signed
        return signed

    def desired(self, edges: list[str], connected: set[str]) -> list[tuple[str, portfolio_pb2.ListVariantsResponse]]:
        """(edge, listing of the portfolio it should hold: its desired one, else the current) of each of
        `edges` in `connected`, in order, leaving out any whose portfolio this cloud no longer serves."""
        current, desired = self.current(), dict(self._db.query("SELECT name, desired_portfolio FROM edges"))
        wanted = [(edge, desired.get(edge) or current) for edge in edges if edge in connected]
        return [(edge, self.listing(pid)) for edge, pid in wanted if self.known(pid)]

    # --- listing versions ----------------------------------------------------------------------------
    def set_validity(self, validity_s: float) -> None:
        """How long listings issued from now on are valid (a value outside the bounds is refused); the
        listings are issued again at once if they are due under it (a cloud restarted late) or valid for
        longer than it (a shorter validity than they were issued with)."""
        _check_validity(validity_s)
        self.validity_s = validity_s
        if self.due() or self._epoch[1] > self._db.clock() + validity_s:
            self.issue()

    def _read_epoch(self) -> tuple[int, int]:
        return int(self._db.setting(LISTING_VERSION) or 0), int(self._db.setting(LISTING_EXPIRES) or 0)

    @property
    def version(self) -> int:
        """The version of the listings the cloud issues now."""
        return self._epoch[0]

    def issue(self, statements: list[tuple[str, tuple]] = ()) -> int:
        """Commit `statements` (the change the new listings announce) and the next listing version, with
        an expiry `validity_s` from now, in one durable transaction; the new version. Push after it."""
        now = self._db.clock()
        self._db.transaction([*statements, *issue_statements(now, int(now + self.validity_s))], durable=True)
        epoch = self._read_epoch()
        with self._lock:
            self._epoch, self._signed = epoch, {}
        log.info("listing version %d, valid until unix %d", epoch[0], epoch[1])
        return epoch[0]

    def due(self) -> bool:
        """Has half of the validity gone by (or more), so the listings must be issued again?"""
        return self._db.clock() >= self._epoch[1] - self.validity_s / 2

    def file(self, variant_id: str) -> tuple[VariantEntry, Path] | None:
        """A member of a portfolio this cloud knows, by its id, with the path of its own file."""
        with self._lock:
            found = self._files.get(variant_id)
        return found if found is not None and found[0].variant_id == variant_id else None

    def artifact(self, file_id: str) -> tuple[Path, int] | None:
        """Any file a listing names, by its id (a member's own file or its ONNX file): its path and
        recorded size, for FetchVariant."""
        with self._lock:
            found = self._files.get(file_id)
        if found is None:
            return None
        entry, path = found
        return path, entry.size_bytes if file_id == entry.variant_id else entry.onnx_bytes
