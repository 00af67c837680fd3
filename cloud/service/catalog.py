"""Every portfolio the cloud serves: the one it started with and every one deployed since.

Portfolios are recorded in the fleet database (id -> store directory), so a restarted cloud still
serves the variants its edges were told to hold. A store is checked before it is added: every variant
file must hash to its id and have its recorded size, since the cloud signs what it serves.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cloud.build.store import Manifest, PortfolioStore, StoreError, VariantEntry
from cloud.service.fleet_db import FleetDB
from common.files import sha256_file
from common.security import Signer
from protos import portfolio_pb2

log = logging.getLogger(__name__)
CURRENT = "portfolio"  # settings key: the portfolio new edges get


def variant_info(entry: VariantEntry, signer: Signer | None) -> portfolio_pb2.VariantInfo:
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
        signature=signer.sign(entry.variant_id) if signer else b"",
    )


def _check_file(path: Path, size: int, file_id: str) -> None:
    if not path.is_file() or path.stat().st_size != size:
        raise StoreError(f"{path} is missing or not {size} bytes")
    if sha256_file(path) != file_id:
        raise StoreError(f"{path} does not hash to its id")


def check_store(store: PortfolioStore) -> Manifest:
    """The portfolio as edges are served it (`Manifest.served`: its variant files), once every file of
    every member (variant files, ONNX files, int8 members) is there with the recorded size and hash."""
    manifest = store.manifest()
    for entry in manifest.variants:
        _check_file(store.member_path(entry), entry.size_bytes, entry.variant_id)
        if entry.onnx_id and entry.onnx_id != entry.variant_id:
            _check_file(store.onnx_path(entry.onnx_id), entry.onnx_bytes, entry.onnx_id)
    return manifest.served()


class Catalog:
    def __init__(self, db: FleetDB, signer: Signer | None = None):
        self._db, self._signer = db, signer
        self._lock = threading.Lock()
        self._manifests: dict[str, Manifest] = {}
        self._files: dict[str, tuple[VariantEntry, Path]] = {}
        self._listings: dict[str, portfolio_pb2.ListVariantsResponse] = {}
        for portfolio_id, root in db.portfolios():
            try:
                self._index(PortfolioStore(Path(root)), PortfolioStore(Path(root)).manifest().served())
            except StoreError as err:
                log.error("portfolio %s in %s can no longer be served: %s", portfolio_id, root, err)

    def _index(self, store: PortfolioStore, manifest: Manifest) -> None:
        listing = portfolio_pb2.ListVariantsResponse(
            variants=[variant_info(v, self._signer) for v in manifest.variants], portfolio_id=manifest.portfolio_id
        )
        with self._lock:
            self._manifests[manifest.portfolio_id] = manifest
            self._listings[manifest.portfolio_id] = listing
            for entry in manifest.variants:
                self._files[entry.variant_id] = (entry, store.variant_path(entry.variant_id))

    def add(self, root: Path) -> Manifest:
        """Check and record a store; its portfolio can be served and deployed from now on."""
        store = PortfolioStore(Path(root).resolve())
        manifest = check_store(store)
        if not manifest.variants:
            raise StoreError(f"portfolio {manifest.portfolio_id} in {root} has no variants")
        self._index(store, manifest)
        self._db.add_portfolio(manifest.portfolio_id, str(store.root))
        return manifest

    def start_with(self, root: Path) -> None:
        """Add the store the cloud was started with; it becomes current unless a rollout chose another."""
        manifest = self.add(root)
        if not self.current() or self.current() not in self._manifests:
            self._db.set_setting(CURRENT, manifest.portfolio_id)

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
        """The variants of a portfolio (default: the current one), signed when the cloud has a key."""
        portfolio_id = portfolio_id or self.current()
        with self._lock:
            listing = self._listings.get(portfolio_id)
        if listing is None:
            raise StoreError(f"portfolio {portfolio_id!r} is not known to this cloud")
        return listing

    def file(self, variant_id: str) -> tuple[VariantEntry, Path] | None:
        with self._lock:
            return self._files.get(variant_id)
