"""The edge's variant cache on disk: one agent per directory, and only what it needs kept.

    CACHE/.lock                  held (flock) by the one agent using this directory; holds its pid
    CACHE/<sha256>.safetensors   verified variant files (`edge.fetcher`)
    CACHE/<sha256>.onnx          verified ONNX files (the ONNX Runtime backend's)
    CACHE/<sha256>.part          downloads in progress

`CacheLock.acquire` takes an exclusive `flock` on the lock file, without waiting: a second agent
given the same directory refuses to start (`CacheInUse`, naming the directory and the holder's pid)
instead of writing into the same `.part` files. The kernel drops the lock when the process ends, so
a killed agent never leaves the directory locked.

`tidy` deletes what the agent no longer needs: variant files outside the held and desired
portfolios beyond a margin (the most recently fetched of them are kept, newest first while they fit
in `margin_bytes`, so going back to a portfolio just left needs no download), and partial downloads
that are not being written and were either not touched for `stale_part_s` or are of a variant no
portfolio needs. Other files are left alone: the directory may be shared with what the agent does
not own.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common.errors import PrunefleetError
from common.files import is_sha256_hex, short_id

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class CacheInUse(PrunefleetError, RuntimeError):
    """Another agent holds the cache directory; the message names it and the holder's pid."""


@dataclass
class CacheLock:
    """An exclusive lock on a cache directory, held until `release` (or the process ends)."""

    directory: Path
    fd: int | None

    @classmethod
    def acquire(cls, directory: Path) -> CacheLock:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheInUse(
                f"cache directory {directory.resolve()} is in use by another agent (pid {holder}); "
                "give each agent its own --cache"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _entries(directory: Path) -> list[tuple[Path, str, str, os.stat_result]]:
    """(path, variant id, suffix, stat) of every variant file and partial download in `directory`."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        stem, _, suffix = path.name.partition(".")
        if suffix in ("safetensors", "onnx", "part") and is_sha256_hex(stem):
            try:
                found.append((path, stem, suffix, path.stat()))
            except FileNotFoundError:  # renamed or deleted meanwhile
                continue
    return found


def tidy(
    directory: Path,
    needed: Iterable[str],
    margin_bytes: int,
    stale_part_s: float,
    now: float,
    writing: Iterable[str] = (),
) -> list[Path]:
    """Delete from `directory` what `needed` (file ids of the held and desired portfolios) does
    not keep, as the module says, as of `now` (the clock of the files' mtimes); the paths deleted.
    `writing` are the ids being downloaded now: their partial files stay whatever their age."""
    needed, writing = set(needed), set(writing)
    doomed, spare = [], []
    for path, variant_id, suffix, stat in _entries(Path(directory)):
        if suffix == "part":
            stale = now - stat.st_mtime > stale_part_s
            if variant_id not in writing and (stale or variant_id not in needed):
                doomed.append(path)
        elif variant_id not in needed:
            spare.append((stat.st_mtime, stat.st_size, path))
    kept, full = 0, False
    for _, size, path in sorted(spare, reverse=True):  # the most recently fetched first, until one does not fit
        full = full or kept + size > margin_bytes
        if full:
            doomed.append(path)
        else:
            kept += size
    removed = []
    for path in doomed:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    for path in removed:
        log.info("cache: removed %s%s", short_id(path.stem), path.suffix)
    return removed
