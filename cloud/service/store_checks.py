"""What the cloud checks before it serves a portfolio store it did not build: where the store is, how
large its files are, what its manifest says, and that every file is what the manifest says it is.

A store named by an operator's deploy lies under the cloud's portfolio root (`resolve_under`): the
path is resolved (`..` and every symlink on the way), and what it resolves to must still be under the
root. Inside a store nothing is followed: `manifest.json`, `variants/` and every member file must be
a regular file (a directory) itself, not a symlink, so no file outside the store can be served as
one of its members. Every size is bounded before anything is read (`StoreLimits`), the manifest must
be one JSON object, and the portfolio id is computed from the members (`served_id`): the id written
in the manifest is never trusted, only compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud.build.store import Manifest, PortfolioStore, StoreError, served_portfolio_id
from common.files import portfolio_id
from common.onnx_format import FLOAT32
from common.variant_spec import MAX_VARIANT_BYTES

NAME_MAX = 255  # bytes of one path component on the file systems the cloud runs on
READ_BYTES = 1 << 20
Progress = Callable[[int], None]  # bytes hashed since the last call


@dataclass(frozen=True)
class StoreLimits:
    """The largest manifest and member file the cloud reads from a store it did not build."""

    max_manifest_bytes: int = 4 << 20
    max_file_bytes: int = MAX_VARIANT_BYTES

    def __post_init__(self) -> None:
        if not 1024 <= self.max_manifest_bytes <= 1 << 30:
            raise ValueError(f"max_manifest_bytes must be in [1 KiB, 1 GiB], got {self.max_manifest_bytes}")
        if not 1 <= self.max_file_bytes <= 1 << 40:
            raise ValueError(f"max_file_bytes must be in [1, 1 TiB], got {self.max_file_bytes}")


def path_problem(given: str) -> str:
    """Why `given` cannot name a path at all ("" when it can)."""
    if not given or "\x00" in given:
        return "an empty path or one with a NUL character"
    if any(len(part.encode()) > NAME_MAX for part in given.split("/")):
        return f"a path with a name over {NAME_MAX} bytes"
    return ""


def resolve_under(root: Path, given: str) -> Path:
    """The store directory `given` names (relative to `root`, or absolute), resolved, refused unless
    it is a directory under `root` once every symlink on the way is followed."""
    base = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(base / given))  # an absolute `given` replaces the base
    if resolved != base and base not in resolved.parents:
        raise StoreError(f"{given[:200]!r} is outside the portfolio root (it resolves to {resolved})")
    if not resolved.is_dir():
        raise StoreError(f"{given[:200]!r} is no directory under the portfolio root")
    return resolved


def _open_regular(path: Path, limit: int, what: str) -> tuple[int, int]:
    """(descriptor, size) of `path`, opened without following a symlink; refused unless it is a
    regular file of at most `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise StoreError(f"{what} {path} is missing") from None
    except OSError as err:  # ELOOP: a symlink
        raise StoreError(f"{what} {path} cannot be read as a regular file (a symlink?): {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
        os.close(fd)
        raise StoreError(f"{what} {path} is not a regular file of at most {limit} bytes")
    return fd, info.st_size


def parse_manifest(data: bytes, where: object) -> Manifest:
    """The manifest these bytes hold; StoreError naming the problem unless they are one JSON object
    that makes a manifest."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise StoreError(f"{where} is not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{where} holds a JSON {type(raw).__name__}, not the JSON object of a manifest")
    try:
        return Manifest.from_json(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise StoreError(f"{where} is not a portfolio manifest: {err}") from None


def read_manifest(store: PortfolioStore, limits: StoreLimits) -> Manifest:
    """The store's manifest, its size bounded before it is read (see `parse_manifest`)."""
    fd, size = _open_regular(store.manifest_path, limits.max_manifest_bytes, "the manifest")
    with os.fdopen(fd, "rb") as f:
        data = f.read(size + 1)
    return parse_manifest(data, store.manifest_path)


def member_files(store: PortfolioStore, manifest: Manifest) -> list[tuple[Path, int, str]]:
    """(path, size, sha256) of every file of every member: its own file and its ONNX file, if any."""
    files = []
    for entry in manifest.variants:
        sizes = (entry.size_bytes, entry.onnx_bytes or 0)
        if not all(isinstance(v, str) for v in (entry.variant_id, entry.onnx_id or "", entry.precision)) or not all(
            isinstance(s, int) and s >= 0 for s in sizes
        ):
            raise StoreError(f"member {str(entry.variant_id)[:80]!r} has ids or sizes of the wrong type")
        files.append((store.member_path(entry), entry.size_bytes, entry.variant_id))
        if entry.onnx_id and entry.onnx_id != entry.variant_id:
            files.append((store.onnx_path(entry.onnx_id), entry.onnx_bytes or 0, entry.onnx_id))
    return files


def check_file(path: Path, size: int, file_id: str, limits: StoreLimits, progress: Progress | None = None) -> None:
    """Refuse a member file that is a symlink, larger than the limit, not `size` bytes or not hashing
    to `file_id`; `progress` hears of every MiB hashed."""
    fd, actual = _open_regular(path, limits.max_file_bytes, "member file")
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        if actual != size:
            raise StoreError(f"{path} is {actual} bytes, its manifest says {size}")
        while block := f.read(READ_BYTES):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    if digest.hexdigest() != file_id:
        raise StoreError(f"{path} does not hash to its id {file_id}")


def served_id(manifest: Manifest, claimed: str = "") -> str:
    """The portfolio id computed from the members served (the build's own id function); `claimed`
    (default: the id written in the manifest) must be it, else StoreError naming both. An id written
    when int8 members were left out of it (the float32 members' id) is taken, under the computed one."""
    claimed = claimed or manifest.portfolio_id
    computed = served_portfolio_id(manifest.served().variants)
    legacy = portfolio_id([e.variant_id for e in manifest.variants if e.precision == FLOAT32])
    if claimed not in (computed, legacy):
        raise StoreError(f"the store claims portfolio id {str(claimed)[:80]!r}, but its members make {computed}")
    return computed


def check_files(store: PortfolioStore, limits: StoreLimits, progress: Progress | None = None) -> Manifest:
    """The store's manifest once every member file checks (`check_file`) and no part of the store is a
    symlink; raises StoreError naming the first problem."""
    manifest = read_manifest(store, limits)
    variants = store.root / "variants"
    if variants.is_symlink() or not variants.is_dir():
        raise StoreError(f"{variants} is not a directory of the store (a symlink, or missing)")
    for path, size, file_id in member_files(store, manifest):
        check_file(path, size, file_id, limits, progress)
    return manifest
