"""Bootstrap tokens and enrolment requests: a small SQLite file of the cloud's own (`enrolment.sqlite`).

Written by the operator's `prunefleet certs token|approve` and read by the cloud's enrolment service
(`cloud.service.enrolment`), both beside the cloud's other files (its `--certs` directory), as the
revocation list is. SQLite's locking lets the two processes share it.

A token is `ID.SECRET` (`ID` 8 hex characters, `SECRET` 256 random bits); only its sha256 is stored,
and it is compared in constant time. It expires (`ttl_s`) and is used once: the first CSR sent with it
binds it to that CSR's key and name, and only the same key may ask with it again (that is how an edge
polls for its certificate). A token created with a name is pre-approved for that name only; one
without needs `approve` once its request arrives. Every change is one immediate transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from common.errors import PrunefleetError

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, hash TEXT NOT NULL, name TEXT, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    key TEXT, request TEXT);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, key TEXT NOT NULL, token TEXT NOT NULL, created_at REAL NOT NULL,
    approved INTEGER NOT NULL, certificate BLOB);
"""
MAX_TOKEN_CHARS = 128


class TokenRefused(PrunefleetError, ValueError):
    """A token that is not (or no longer) good for this request; `unknown` when it was never valid."""

    def __init__(self, message: str, unknown: bool = False):
        super().__init__(message)
        self.unknown = unknown


@dataclass(frozen=True)
class Request:
    """One enrolment request: the name and key it was made for, and whether it is approved or issued."""

    id: str
    name: str
    key: str  # sha256 of the public key (issuer.key_fingerprint)
    created_at: float
    approved: bool
    certificate: bytes | None
    token_created_at: float


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EnrolmentStore:
    """Tokens and requests in one SQLite file; every method opens its own connection (thread-safe)."""

    def __init__(self, path: Path, clock: Callable[[], float]):
        self.path, self._clock = Path(path), clock
        with closing(self._connect()) as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def create_token(self, name: str | None, ttl_s: float) -> str:
        """A new token (returned once, never stored), bound to `name` when given."""
        token_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        token, now = f"{token_id}.{secret}", self._clock()
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO tokens (id, hash, name, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (token_id, _hash(token), name, now, now + ttl_s),
            )
        return token

    def claim(self, token: str, name: str, key: str) -> Request:
        """The request `token` stands for: made now for (`name`, `key`) on first use, else the one it
        was used for, if it was for this key. TokenRefused says why not."""
        token_id, _, _ = token.partition(".")
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                request_id = self._claim(db, token, token_id, name, key)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.request(request_id)

    def _claim(self, db: sqlite3.Connection, token: str, token_id: str, name: str, key: str) -> str:
        row = db.execute("SELECT hash, name, expires_at, key, request FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _hash(token)):
            raise TokenRefused("unknown bootstrap token", unknown=True)
        bound, expires_at, used_key, request_id = row[1:]
        if self._clock() >= expires_at:
            raise TokenRefused("the bootstrap token has expired; ask the operator for a new one", unknown=True)
        if bound is not None and bound != name:
            raise TokenRefused(f"this bootstrap token is for edge '{bound}', not '{name}'")
        if used_key is not None:
            if used_key != key:
                raise TokenRefused("this bootstrap token was already used, with another key")
            return request_id
        request_id = secrets.token_hex(8)
        db.execute(
            "INSERT INTO requests (id, name, key, token, created_at, approved) VALUES (?, ?, ?, ?, ?, ?)",
            (request_id, name, key, token_id, self._clock(), int(bound is not None)),
        )
        db.execute("UPDATE tokens SET key = ?, request = ? WHERE id = ?", (key, request_id, token_id))
        return request_id

    def request(self, request_id: str) -> Request:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT r.id, r.name, r.key, r.created_at, r.approved, r.certificate, t.created_at "
                "FROM requests r JOIN tokens t ON t.id = r.token WHERE r.id = ?",
                (request_id,),
            ).fetchone()
        if row is None:
            raise KeyError(request_id)
        return Request(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6])

    def issued(self, request_id: str, certificate: bytes) -> None:
        with closing(self._connect()) as db:
            db.execute("UPDATE requests SET certificate = ? WHERE id = ?", (certificate, request_id))

    def pending(self) -> list[Request]:
        """Requests waiting for `approve`, oldest first (those whose token has expired left out)."""
        with closing(self._connect()) as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT r.id FROM requests r JOIN tokens t ON t.id = r.token "
                    "WHERE r.approved = 0 AND t.expires_at > ? ORDER BY r.created_at",
                    (self._clock(),),
                )
            ]
        return [self.request(request_id) for request_id in ids]

    def approve(self, name_or_id: str) -> int:
        """Approve every pending request of this edge name (or with this request id); how many."""
        with closing(self._connect()) as db:
            return db.execute(
                "UPDATE requests SET approved = 1 WHERE approved = 0 AND (name = ? OR id = ?) "
                "AND token IN (SELECT id FROM tokens WHERE expires_at > ?)",
                (name_or_id, name_or_id, self._clock()),
            ).rowcount

    def prune(self, keep_s: float = 86400.0) -> int:
        """Forget tokens (and their requests) expired more than `keep_s` ago; how many tokens."""
        cutoff = self._clock() - keep_s
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM requests WHERE token IN (SELECT id FROM tokens WHERE expires_at < ?)", (cutoff,))
            gone = db.execute("DELETE FROM tokens WHERE expires_at < ?", (cutoff,)).rowcount
            db.execute("COMMIT")
        return gone
