"""Durable fleet state in SQLite: edges (desired and reported portfolio and policy), their telemetry
windows and profiles, the policy, the switch audit log, the portfolios the cloud serves, rollouts.

Protobuf messages are stored as their serialized bytes (never pickled). One connection guarded by a
lock: the coordinator's writes are small and frequent, and SQLite in WAL mode keeps readers cheap.
Edge reports arrive at fleet rate (1000 edges: 1000 windows a second); the coordinator hands them to
`cloud.reports.ReportWriter`, which stores a tick's worth in one transaction (`record_reports`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from protos import coordinator_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS edges (
    name TEXT PRIMARY KEY, address TEXT, metrics_address TEXT, threads INTEGER,
    registered_at REAL, last_seen REAL, telemetry BLOB, policy_version INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS profiles (
    edge TEXT, variant_id TEXT, profile BLOB, PRIMARY KEY (edge, variant_id));
CREATE TABLE IF NOT EXISTS policy (id INTEGER PRIMARY KEY CHECK (id = 1), policy BLOB);
CREATE TABLE IF NOT EXISTS policies (version INTEGER PRIMARY KEY, saved_at REAL, policy BLOB);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, edge TEXT, timestamp REAL, event BLOB);
CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp);
CREATE TABLE IF NOT EXISTS windows (
    edge TEXT, timestamp REAL, portfolio_id TEXT, p95_ms REAL, requests INTEGER, errors INTEGER,
    PRIMARY KEY (edge, timestamp));
CREATE TABLE IF NOT EXISTS portfolios (id TEXT PRIMARY KEY, store TEXT, added_at REAL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS pins (edge TEXT PRIMARY KEY, variant_id TEXT, pinned_at REAL);
CREATE TABLE IF NOT EXISTS rollouts (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT, rollout BLOB);
CREATE TABLE IF NOT EXISTS rollout_edges (
    rollout_id INTEGER, edge TEXT, previous TEXT, canary INTEGER, PRIMARY KEY (rollout_id, edge));
"""
# columns added after the first release: (table, column, declaration)
COLUMNS = (
    ("edges", "desired_portfolio", "TEXT DEFAULT ''"),
    ("edges", "reported_portfolio", "TEXT DEFAULT ''"),
    ("edges", "telemetry_at", "REAL DEFAULT 0"),
)
KEEP_WINDOWS_S = 6 * 3600.0  # telemetry history per edge (rollouts judge canaries on it)


def _telemetry_statements(edge: str, t: coordinator_pb2.Telemetry, now: float) -> list[tuple[str, tuple]]:
    return [
        (
            "INSERT OR IGNORE INTO windows (edge, timestamp, portfolio_id, p95_ms, requests, errors) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (edge, t.timestamp, t.portfolio_id, t.p95_ms, t.requests, t.errors),
        ),
        ("DELETE FROM windows WHERE edge = ? AND timestamp < ?", (edge, t.timestamp - KEEP_WINDOWS_S)),
        ("UPDATE edges SET last_seen = ? WHERE name = ?", (now, edge)),
        (
            "UPDATE edges SET telemetry = ?, telemetry_at = ?, reported_portfolio = ?, policy_version = ? "
            "WHERE name = ? AND telemetry_at <= ?",
            (t.SerializeToString(), t.timestamp, t.portfolio_id, t.policy_version, edge, t.timestamp),
        ),
    ]


def _event_statement(edge: str, event: coordinator_pb2.SwitchEvent) -> tuple[str, tuple]:
    blob = event.SerializeToString()
    return (
        "INSERT INTO events (edge, timestamp, event) SELECT ?, ?, ? WHERE NOT EXISTS "
        "(SELECT 1 FROM events WHERE timestamp = ? AND edge = ? AND event = ?)",
        (edge, event.timestamp, blob, event.timestamp, edge, blob),
    )


def _profile_statement(edge: str, profile: coordinator_pb2.VariantProfile) -> tuple[str, tuple]:
    return (
        "INSERT OR REPLACE INTO profiles (edge, variant_id, profile) VALUES (?, ?, ?)",
        (edge, profile.variant_id, profile.SerializeToString()),
    )


class FleetDB:
    def __init__(self, path: Path | str, clock: Callable[[], float]):
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        for table, column, declaration in COLUMNS:
            if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def transaction(self, statements: list[tuple[str, tuple]]) -> None:
        """Several writes that land together or not at all."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
        self.transaction(_telemetry_statements(edge, telemetry, self._clock()))

    def record_reports(self, reports: list[coordinator_pb2.EdgeReport]) -> None:
        """Many edges' reports in one transaction (the coordinator's writer batches a tick's worth):
        each as `record_telemetry`, `record_event`, `record_profile` or `touch` would store it alone."""
        now, statements = self._clock(), []
        for report in reports:
            kind, edge = report.WhichOneof("body"), report.edge
            if kind == "telemetry":
                statements += _telemetry_statements(edge, report.telemetry, now)
            elif kind == "switch":
                statements.append(_event_statement(edge, report.switch))
            elif kind == "profile":
                statements.append(_profile_statement(edge, report.profile))
            else:
                statements.append(("UPDATE edges SET last_seen = ? WHERE name = ?", (now, edge)))
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
        self.transaction([("UPDATE edges SET desired_portfolio = ? WHERE name = ?", (portfolio_id, e)) for e in edges])

    def desired(self, edge: str) -> str:
        rows = self._read("SELECT desired_portfolio FROM edges WHERE name = ?", (edge,))
        return rows[0][0] or "" if rows else ""

    def set_pins(self, edges: list[str], variant_id: str) -> None:
        """Pin `edges` to `variant_id`, or unpin them when it is ""."""
        if variant_id:
            self.transaction(
                [
                    (
                        "INSERT OR REPLACE INTO pins (edge, variant_id, pinned_at) VALUES (?, ?, ?)",
                        (e, variant_id, self._clock()),
                    )
                    for e in edges
                ]
            )
        else:
            self.transaction([("DELETE FROM pins WHERE edge = ?", (e,)) for e in edges])

    def pins(self) -> dict[str, str]:
        return dict(self._read("SELECT edge, variant_id FROM pins"))

    def edge_names(self) -> list[str]:
        return [row[0] for row in self._read("SELECT name FROM edges ORDER BY name")]

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
        self._write(*_profile_statement(edge, profile))

    def record_event(self, edge: str, event: coordinator_pb2.SwitchEvent) -> None:
        """Idempotent: an edge resends the events of a stream that broke, so a copy is stored once."""
        self._write(*_event_statement(edge, event))

    def policy(self) -> coordinator_pb2.Policy | None:
        rows = self._read("SELECT policy FROM policy WHERE id = 1")
        return coordinator_pb2.Policy.FromString(rows[0][0]) if rows else None

    def save_policy(self, policy: coordinator_pb2.Policy) -> None:
        """The current policy, and every version ever set (the policy history)."""
        blob = policy.SerializeToString()
        self.transaction(
            [
                ("INSERT OR REPLACE INTO policy (id, policy) VALUES (1, ?)", (blob,)),
                (
                    "INSERT OR REPLACE INTO policies (version, saved_at, policy) VALUES (?, ?, ?)",
                    (policy.version, self._clock(), blob),
                ),
            ]
        )

    def policies(self) -> list[coordinator_pb2.Policy]:
        return [
            coordinator_pb2.Policy.FromString(row[0])
            for row in self._read("SELECT policy FROM policies ORDER BY version")
        ]

    def edge_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM edges")[0][0]

    def edges(self) -> list[coordinator_pb2.EdgeStatus]:
        rows = self._read(
            "SELECT name, address, metrics_address, registered_at, last_seen, telemetry, "
            "policy_version, desired_portfolio, reported_portfolio FROM edges ORDER BY name"
        )
        profiles: dict[str, list] = {}
        for edge, blob in self._read("SELECT edge, profile FROM profiles ORDER BY edge, variant_id"):
            profiles.setdefault(edge, []).append(coordinator_pb2.VariantProfile.FromString(blob))
        return [
            coordinator_pb2.EdgeStatus(
                edge=name,
                address=address or "",
                metrics_address=metrics or "",
                registered_at=registered or 0.0,
                last_seen=seen or 0.0,
                policy_version=version or 0,
                profiles=profiles.get(name, []),
                telemetry=coordinator_pb2.Telemetry.FromString(blob) if blob else None,
                desired_portfolio_id=desired or "",
                reported_portfolio_id=reported or "",
            )
            for name, address, metrics, registered, seen, blob, version, desired, reported in rows
        ]

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
