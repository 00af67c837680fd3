"""Durable fleet state in SQLite: edges (desired and reported portfolio and policy), their telemetry
windows and profiles, the policy, the switch audit log, the portfolios the cloud serves, rollouts.

Protobuf messages are stored as their serialized bytes (never pickled). One connection guarded by a
lock: the coordinator's writes are small and frequent, and SQLite in WAL mode keeps readers cheap.
Edge reports arrive at fleet rate (every edge sends a window each `window_s`); the coordinator hands
them to `cloud.service.report_writer.ReportWriter`, which stores a tick's worth in one transaction
(`record_reports`).

Policy versions are numbered here, in the transaction that stores them, never by callers: operator
calls that arrive at once each get their own version, and the history keeps every one.

Durability. The database runs in WAL mode with `synchronous=NORMAL`: a commit is on disk once the
WAL is checkpointed, so a power cut may lose the last reports, which edges send again anyway. What
the coordinator tells edges is different: rollout changes (`transaction(durable=True)`) and policy
versions (`set_policy`, `pin`, `save_policy`) commit with `synchronous=FULL`, the WAL synced before
the commit returns, and only then does any directive go out. Otherwise a coordinator restarted after
a power cut could have forgotten a rollout its canaries already act on (and never roll it back), or
hand out a policy version number again with other contents, which an edge that applied the first
would take for the one it holds.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud.service import fleet_pages
from cloud.service.fleet_schema import (
    COLUMNS,
    KEEP_PROFILES,
    LATE_INDEXES,
    SCHEMA,
    event_statement,
    keep_profiles_statement,
    pin_statements,
    profile_statement,
    telemetry_statements,
)
from common.errors import PrunefleetError
from protos import coordinator_pb2


class NoPolicy(PrunefleetError, LookupError):
    """A pin asked for a new policy version before any policy was stored (the coordinator seeds one)."""


class FleetDB:
    """The fleet's state; `keep_profiles` bounds the profiles kept per edge (the newest stored), on write."""

    def __init__(self, path: Path | str, clock: Callable[[], float], keep_profiles: int = KEEP_PROFILES):
        if keep_profiles < 1:
            raise ValueError("keep_profiles must be >= 1")
        self._clock, self._keep_profiles = clock, keep_profiles
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table, column, declaration, fill in COLUMNS:
            if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.executescript(  # the column and what fills it land together
                    f"BEGIN; ALTER TABLE {table} ADD COLUMN {column} {declaration}; {fill or ''}; COMMIT;"
                )
        self._db.executescript(LATE_INDEXES)

    @property
    def clock(self) -> Callable[[], float]:
        """The coordinator's clock, which dates what is stored (and what retention prunes by)."""
        return self._clock

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def _immediate(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction, taken before the first read (`BEGIN IMMEDIATE`),
        so what is read in it cannot change before the commit, in this process or another. `durable`:
        the commit is synced to disk before this returns (`synchronous=FULL`, see the module's doc)."""
        with self._lock:
            if durable:  # a connection's setting, which SQLite lets change only between transactions
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def transaction(self, statements: list[tuple[str, tuple]], durable: bool = False) -> None:
        """Several writes that land together or not at all; `durable`: synced before this returns."""
        with self._immediate(durable) as db:
            for sql, args in statements:
                db.execute(sql, args)

    query, execute = _read, _write

    def register(self, request: coordinator_pb2.RegisterRequest) -> None:
        now = self._clock()
        self._write(
            "INSERT INTO edges (name, address, metrics_address, threads, registered_at, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET address=excluded.address, "
            "metrics_address=excluded.metrics_address, threads=excluded.threads, last_seen=excluded.last_seen",
            (request.edge, request.address, request.metrics_address, request.threads, now, now),
        )

    def is_registered(self, edge: str) -> bool:
        return bool(self._read("SELECT 1 FROM edges WHERE name = ?", (edge,)))

    def touch(self, edge: str) -> None:
        self._write("UPDATE edges SET last_seen = ? WHERE name = ?", (self._clock(), edge))

    def record_telemetry(self, edge: str, telemetry: coordinator_pb2.Telemetry) -> None:
        """Keep the window (once, however often it is resent) and, if it is the newest, the edge's
        reported state. Windows buffered while the cloud was away arrive late and out of date."""
        self.transaction(telemetry_statements(edge, telemetry, self._clock()))

    def record_reports(self, reports: list[coordinator_pb2.EdgeReport]) -> None:
        """Many edges' reports in one transaction (the coordinator's writer batches a tick's worth):
        each as `record_telemetry`, `record_event`, `record_profile` or `touch` would store it alone."""
        now, statements, profiled = self._clock(), [], set()
        for report in reports:
            kind, edge = report.WhichOneof("body"), report.edge
            if kind == "telemetry":
                statements += telemetry_statements(edge, report.telemetry, now)
            elif kind == "switch":
                statements.append(event_statement(edge, report.switch, now))
            elif kind == "profile":
                statements.append(profile_statement(edge, report.profile))
                profiled.add(edge)
            else:
                statements.append(("UPDATE edges SET last_seen = ? WHERE name = ?", (now, edge)))
        statements += [keep_profiles_statement(edge, self._keep_profiles) for edge in sorted(profiled)]
        self.transaction(statements)

    def windows(self, edges: list[str], portfolio_id: str, since: float) -> list[tuple[str, float, int, int]]:
        """(edge, p95_ms, requests, errors) of the windows `edges` reported on `portfolio_id` since `since`."""
        marks = ",".join("?" * len(edges))
        return self._read(
            f"SELECT edge, p95_ms, requests, errors FROM windows WHERE edge IN ({marks}) "
            "AND portfolio_id = ? AND timestamp >= ? ORDER BY timestamp",
            (*edges, portfolio_id, since),
        )

    # --- desired state ---------------------------------------------------------------------------------
    def set_desired(self, edges: list[str], portfolio_id: str) -> None:
        """Not synchronous: it gives a new edge the current portfolio, which it would get again after a loss."""
        self.transaction([("UPDATE edges SET desired_portfolio = ? WHERE name = ?", (portfolio_id, e)) for e in edges])

    def desired(self, edge: str) -> str:
        rows = self._read("SELECT desired_portfolio FROM edges WHERE name = ?", (edge,))
        return rows[0][0] or "" if rows else ""

    def pins(self) -> dict[str, str]:
        return dict(self._read("SELECT edge, variant_id FROM pins"))

    def edge_names(self) -> list[str]:
        return [row[0] for row in self._read("SELECT name FROM edges ORDER BY name")]

    def registrations(self) -> list[tuple[str, float]]:
        """(name, first registered at) of every edge, in the order they first registered (registering
        again keeps an edge's place; the name never decides it)."""
        return self._read("SELECT name, registered_at FROM edges ORDER BY registered_at, rowid")

    def setting(self, key: str) -> str:
        rows = self._read("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else ""

    def set_setting(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def add_portfolio(self, portfolio_id: str, store: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO portfolios (id, store, added_at) VALUES (?, ?, ?)",
            (portfolio_id, store, self._clock()),
        )

    def portfolios(self) -> list[tuple[str, str]]:
        return self._read("SELECT id, store FROM portfolios ORDER BY added_at")

    def record_profile(self, edge: str, profile: coordinator_pb2.VariantProfile) -> None:
        self.transaction([profile_statement(edge, profile), keep_profiles_statement(edge, self._keep_profiles)])

    def record_event(self, edge: str, event: coordinator_pb2.SwitchEvent) -> None:
        """Idempotent: an edge resends the events of a stream that broke, so a copy is stored once."""
        self._write(*event_statement(edge, event, self._clock()))

    def policy(self) -> coordinator_pb2.Policy | None:
        rows = self._read("SELECT policy FROM policy WHERE id = 1")
        return coordinator_pb2.Policy.FromString(rows[0][0]) if rows else None

    def save_policy(self, policy: coordinator_pb2.Policy) -> None:
        """Store `policy` with the version it carries as the current one and in the history: for seeding
        the first policy. Changes of a running fleet go through `set_policy` and `pin`, which number them."""
        blob = policy.SerializeToString()
        with self._immediate(durable=True) as db:
            db.execute("INSERT OR REPLACE INTO policy (id, policy) VALUES (1, ?)", (blob,))
            db.execute(
                "INSERT OR REPLACE INTO policies (version, saved_at, policy) VALUES (?, ?, ?)",
                (policy.version, self._clock(), blob),
            )

    def set_policy(self, policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
        """Store `policy` as the next version and make it current; the stored policy, with its version."""
        with self._immediate(durable=True) as db:
            return self._store_next(db, policy)

    def pin(self, edges: list[str], variant_id: str) -> coordinator_pb2.Policy:
        """Pin `edges` to `variant_id` (unpin them when it is "") and store the current policy again as
        the next version, in one transaction: edges report the version they apply, so the coordinator
        sees which edges have taken the pin. The stored policy, with its new version."""
        with self._immediate(durable=True) as db:
            for sql, args in pin_statements(edges, variant_id, self._clock()):
                db.execute(sql, args)
            return self._store_next(db, None)

    def _store_next(self, db: sqlite3.Connection, policy: coordinator_pb2.Policy | None) -> coordinator_pb2.Policy:
        """Inside a transaction: `policy` (None: the current one again) numbered one past every version
        stored so far, added to the history (never replacing a row) and made current."""
        row = db.execute("SELECT policy FROM policy WHERE id = 1").fetchone()
        current = coordinator_pb2.Policy.FromString(row[0]) if row else None
        if policy is None and current is None:
            raise NoPolicy("no policy is stored yet: set one before pinning")
        latest = db.execute("SELECT MAX(version) FROM policies").fetchone()[0] or 0
        stored = coordinator_pb2.Policy()
        stored.CopyFrom(current if policy is None else policy)
        stored.version = max(latest, current.version if current else 0) + 1
        blob = stored.SerializeToString()
        db.execute(
            "INSERT INTO policies (version, saved_at, policy) VALUES (?, ?, ?)", (stored.version, self._clock(), blob)
        )
        db.execute("INSERT OR REPLACE INTO policy (id, policy) VALUES (1, ?)", (blob,))
        return stored

    def policies(self) -> list[coordinator_pb2.Policy]:
        return [
            coordinator_pb2.Policy.FromString(row[0])
            for row in self._read("SELECT policy FROM policies ORDER BY version")
        ]

    def edge_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM edges")[0][0]

    def edges(self) -> list[coordinator_pb2.EdgeStatus]:
        """Every edge with its profiles, by name (all pages of `fleet_pages.edges_page`)."""
        return fleet_pages.all_edges(self)

    def reported(self, edges: list[str]) -> dict[str, str]:
        """The portfolio each of `edges` last said it holds, by name (known edges only)."""
        marks = ",".join("?" * len(edges))
        return dict(self._read(f"SELECT name, reported_portfolio FROM edges WHERE name IN ({marks})", tuple(edges)))

    def events(self, edge: str = "", since: float = 0.0, limit: int = 1000) -> list[coordinator_pb2.EdgeEvent]:
        sql = "SELECT edge, event FROM events WHERE timestamp >= ?"
        args: tuple = (since,)
        if edge:
            sql, args = sql + " AND edge = ?", args + (edge,)
        rows = self._read(sql + " ORDER BY timestamp DESC, id DESC LIMIT ?", args + (limit,))
        return [
            coordinator_pb2.EdgeEvent(edge=e, event=coordinator_pb2.SwitchEvent.FromString(b))
            for e, b in reversed(rows)
        ]
