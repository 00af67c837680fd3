"""Atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SHORT_ID_HEX = 12  # hex digits that name a variant or portfolio to people: in logs, tables, metric labels


def short_id(full_id: str) -> str:
    """The first `SHORT_ID_HEX` hex digits of a sha256 id, how people and metric labels see it."""
    return full_id[:SHORT_ID_HEX]


def is_sha256_hex(text: str) -> bool:
    return bool(SHA256_HEX.fullmatch(text))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def portfolio_id(variant_ids) -> str:
    """A portfolio's identity is the hash of its variants' identities (cloud and edge compute it alike)."""
    return sha256_bytes("\n".join(sorted(variant_ids)).encode())[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
