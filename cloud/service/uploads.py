"""A portfolio store an operator uploads (`CoordinatorService.UploadPortfolio`), written into the cloud's
own uploads directory so that nothing half-written can ever be served.

The pieces are written into a staging directory (`.incoming-*`) that no catalog ever names: the
manifest first (its size bounded, one JSON object), which says which member files must follow and
how large each is, so the whole upload is bounded (`max_upload_bytes`) before a byte of them is
taken; then each file, its size and sha256 checked once it is complete. Only a complete store whose
members make the id its manifest claims is renamed, in one step, to `UPLOADS/<portfolio id>`; a
failed or broken upload leaves nothing behind, and staging left by a cloud that died mid-upload is
removed when the next one starts (`clear_staging`). An upload is not resumed: it is sent again whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cloud.build.store import PortfolioStore, StoreError
from cloud.service.store_checks import StoreLimits, member_files, parse_manifest, served_id
from common.errors import PrunefleetError
from common.files import fsync_dir
from protos import coordinator_pb2

MANIFEST = "manifest.json"
MAX_PIECE_BYTES = 4 << 20  # the client sends 1 MiB; anything past this is no client of ours
STAGING = ".incoming-"


class UploadError(PrunefleetError, ValueError):
    """An upload that does not make a store the cloud can take; the message names the problem."""


@dataclass
class _File:
    """The file being received: where it goes, what it must be, and what came so far."""

    path: Path
    size: int
    sha256: str
    received: int = 0
    digest: object = field(default_factory=hashlib.sha256)


class Receiver:
    """One upload into `staging` (see the module's doc); `expected` is filled from the manifest."""

    def __init__(self, staging: Path, limits: StoreLimits, max_bytes: int):
        self.staging, self._limits, self._max_bytes = staging, limits, max_bytes
        self.expected: dict[str, tuple[int, str]] | None = None  # relative path -> (size, sha256)
        self.received: set[str] = set()
        self.total = 0
        self._file: _File | None = None
        self._handle = None
        self._manifest = bytearray()

    def piece(self, piece: coordinator_pb2.UploadPiece) -> None:
        if piece.path:
            self._finish()
            self._open(piece)
        elif self._file is None:
            raise UploadError("the first piece of an upload names its file (path, size, sha256)")
        if len(piece.data) > MAX_PIECE_BYTES:
            raise UploadError(f"a piece carries at most {MAX_PIECE_BYTES} bytes of data")
        file = self._file
        if file.received + len(piece.data) > file.size:
            raise UploadError(f"{file.path.name} is longer than the {file.size} bytes announced")
        file.received += len(piece.data)
        file.digest.update(piece.data)
        if self.expected is None:
            self._manifest += piece.data
        else:
            self._handle.write(piece.data)
        self.total += len(piece.data)

    def _open(self, piece: coordinator_pb2.UploadPiece) -> None:
        name = piece.path
        if self.expected is None:
            if name != MANIFEST:
                raise UploadError(f"an upload starts with {MANIFEST}, not {name[:200]!r}")
            if not 0 <= piece.size <= self._limits.max_manifest_bytes:
                raise UploadError(f"{MANIFEST} is at most {self._limits.max_manifest_bytes} bytes")
            self._file = _File(self.staging / MANIFEST, piece.size, piece.sha256)
            return
        if name not in self.expected or name in self.received:
            raise UploadError(f"{name[:200]!r} is no member file of the manifest still to come")
        size, sha256 = self.expected[name]
        if (piece.size, piece.sha256) != (size, sha256):
            raise UploadError(f"{name} is announced as {piece.size} bytes, sha256 {piece.sha256[:64]!r}: not as listed")
        self._file = _File(self.staging / name, size, sha256)
        self._file.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self._file.path, "xb")  # closed in _finish, or by close()

    def _finish(self) -> None:
        """Check the file just received: complete, and hashing to its sha256."""
        file = self._file
        if file is None:
            return
        if file.received != file.size or file.digest.hexdigest() != file.sha256:
            raise UploadError(f"{file.path.name} came as {file.received} of {file.size} bytes, or hashes otherwise")
        if self.expected is None:
            self._take_manifest(bytes(self._manifest))
        else:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
            self.received.add(str(file.path.relative_to(self.staging)))
        self._file = None

    def _take_manifest(self, data: bytes) -> None:
        try:
            manifest = parse_manifest(data, f"the uploaded {MANIFEST}")
            files = member_files(PortfolioStore(self.staging), manifest)
            served_id(manifest)
        except StoreError as err:
            raise UploadError(str(err)) from None
        total = len(data) + sum(size for _, size, _ in files)
        if total > self._max_bytes:
            raise UploadError(f"the store is {total} bytes; this cloud takes uploads of at most {self._max_bytes}")
        big = [p.name for p, size, _ in files if size > self._limits.max_file_bytes]
        if big:
            raise UploadError(f"{big[0]} is larger than the {self._limits.max_file_bytes} bytes a member may be")
        (self.staging / "variants").mkdir()
        (self.staging / MANIFEST).write_bytes(data)
        self.expected = {str(p.relative_to(self.staging)): (size, sha) for p, size, sha in files}

    def complete(self) -> None:
        """Check that every file came, and sync them all to disk."""
        self._finish()
        if self.expected is None:
            raise UploadError(f"the upload carried no {MANIFEST}")
        missing = sorted(set(self.expected) - self.received)
        if missing:
            raise UploadError(f"{len(missing)} member file(s) did not come, e.g. {missing[0]}")
        with open(self.staging / MANIFEST, "rb+") as f:
            os.fsync(f.fileno())
        fsync_dir(self.staging / "variants")
        fsync_dir(self.staging)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class Uploads:
    """The uploads directory: complete stores by portfolio id, and the staging of uploads in progress."""

    def __init__(self, directory: Path, limits: StoreLimits, max_bytes: int):
        self.directory, self._limits, self._max_bytes = Path(directory), limits, max_bytes
        self._finishing = threading.Lock()  # two uploads of one portfolio: one renames, the other keeps it

    def clear_staging(self) -> list[Path]:
        """Remove the staging an earlier process left (it died mid-upload); the directories removed. The
        uploads directory itself is made by the first upload."""
        if not self.directory.is_dir():
            return []
        left = sorted(p for p in self.directory.iterdir() if p.name.startswith(STAGING))
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        return left

    def receive(self, pieces: Iterable[coordinator_pb2.UploadPiece]) -> tuple[Path, int]:
        """(the complete store's directory, bytes received); UploadError naming the problem, with
        nothing left behind, when the pieces do not make a store."""
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=self.directory))
        receiver = Receiver(staging, self._limits, self._max_bytes)
        try:
            for piece in pieces:
                receiver.piece(piece)
            receiver.complete()
            portfolio = served_id(parse_manifest((staging / MANIFEST).read_bytes(), MANIFEST))
            return self._settle(staging, self.directory / portfolio), receiver.total
        except StoreError as err:
            raise UploadError(str(err)) from None
        finally:
            receiver.close()
            shutil.rmtree(staging, ignore_errors=True)

    def _settle(self, staging: Path, final: Path) -> Path:
        """Rename the complete staging to `final` in one step. When an earlier upload put the same
        portfolio there, its member files are replaced one by one (each is named by its content, so a
        replacement only ever repairs one) and its manifest is kept: a listing changes only by a new id."""
        with self._finishing:
            if not final.exists():
                os.rename(staging, final)
            else:
                for path in sorted((staging / "variants").iterdir()):
                    os.replace(path, final / "variants" / path.name)
                fsync_dir(final / "variants")
            fsync_dir(self.directory)
        return final
