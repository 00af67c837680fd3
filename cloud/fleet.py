"""Durable fleet state in SQLite: edges, their latest telemetry and profiles, the policy, switch events.

Protobuf messages are stored as their serialized bytes (never pickled). One connection guarded by a
lock: the coordinator's writes are small and frequent, and SQLite in WAL mode keeps readers cheap.
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
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, edge TEXT, timestamp REAL, event BLOB);
CREATE INDEX IF NOT EXISTS events_by_time ON events (timestamp);
"""


class FleetDB:
    def __init__(self, path: Path | str, clock: Callable[[], float]):
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def register(self, request: coordinator_pb2.RegisterRequest) -> None:
        now = self._clock()
        self._write(
            "INSERT INTO edges (name, address, metrics_address, threads, registered_at, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET address=excluded.address, "
            "metrics_address=excluded.metrics_address, threads=excluded.threads, last_seen=excluded.last_seen",
            (request.edge, request.address, request.metrics_address, request.threads, now, now))

    def is_registered(self, edge: str) -> bool:
        return bool(self._read("SELECT 1 FROM edges WHERE name = ?", (edge,)))

    def touch(self, edge: str) -> None:
        self._write("UPDATE edges SET last_seen = ? WHERE name = ?", (self._clock(), edge))

    def record_telemetry(self, edge: str, telemetry: coordinator_pb2.Telemetry) -> None:
        self._write("UPDATE edges SET telemetry = ?, last_seen = ? WHERE name = ?",
                    (telemetry.SerializeToString(), self._clock(), edge))

    def record_profile(self, edge: str, profile: coordinator_pb2.VariantProfile) -> None:
        self._write("INSERT OR REPLACE INTO profiles (edge, variant_id, profile) VALUES (?, ?, ?)",
                    (edge, profile.variant_id, profile.SerializeToString()))

    def record_event(self, edge: str, event: coordinator_pb2.SwitchEvent) -> None:
        """Idempotent: an edge resends the events of a stream that broke, so a copy is stored once."""
        blob = event.SerializeToString()
        self._write("INSERT INTO events (edge, timestamp, event) SELECT ?, ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM events WHERE timestamp = ? AND edge = ? AND event = ?)",
                    (edge, event.timestamp, blob, event.timestamp, edge, blob))

    def set_policy_version(self, edge: str, version: int) -> None:
        self._write("UPDATE edges SET policy_version = ? WHERE name = ?", (version, edge))

    def policy(self) -> coordinator_pb2.Policy | None:
        rows = self._read("SELECT policy FROM policy WHERE id = 1")
        return coordinator_pb2.Policy.FromString(rows[0][0]) if rows else None

    def save_policy(self, policy: coordinator_pb2.Policy) -> None:
        self._write("INSERT OR REPLACE INTO policy (id, policy) VALUES (1, ?)", (policy.SerializeToString(),))

    def edge_count(self) -> int:
        return self._read("SELECT COUNT(*) FROM edges")[0][0]

    def edges(self) -> list[coordinator_pb2.EdgeStatus]:
        rows = self._read("SELECT name, address, metrics_address, registered_at, last_seen, telemetry, "
                          "policy_version FROM edges ORDER BY name")
        profiles: dict[str, list] = {}
        for edge, blob in self._read("SELECT edge, profile FROM profiles ORDER BY edge, variant_id"):
            profiles.setdefault(edge, []).append(coordinator_pb2.VariantProfile.FromString(blob))
        return [coordinator_pb2.EdgeStatus(
            edge=name, address=address or "", metrics_address=metrics or "", registered_at=registered or 0.0,
            last_seen=seen or 0.0, policy_version=version or 0, profiles=profiles.get(name, []),
            telemetry=coordinator_pb2.Telemetry.FromString(blob) if blob else None)
            for name, address, metrics, registered, seen, blob, version in rows]

    def events(self, edge: str = "", since: float = 0.0, limit: int = 1000) -> list[coordinator_pb2.EdgeEvent]:
        sql = "SELECT edge, event FROM events WHERE timestamp >= ?"
        args: tuple = (since,)
        if edge:
            sql, args = sql + " AND edge = ?", args + (edge,)
        rows = self._read(sql + " ORDER BY timestamp DESC, id DESC LIMIT ?", args + (limit,))
        return [coordinator_pb2.EdgeEvent(edge=e, event=coordinator_pb2.SwitchEvent.FromString(b))
                for e, b in reversed(rows)]
