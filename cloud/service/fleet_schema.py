"""The fleet database's tables, and the statements that store what edges report and the listing version.

Kept apart from `cloud.service.fleet_db.FleetDB` (which runs them) so the layout of the data reads
in one place. Protobuf messages are stored as their serialized bytes, never pickled.
"""

from __future__ import annotations

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
CREATE INDEX IF NOT EXISTS events_by_edge ON events (edge, timestamp);
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
# columns added after the first release: (table, column, declaration, what fills the rows already there)
COLUMNS = (
    ("edges", "desired_portfolio", "TEXT DEFAULT ''", None),
    ("edges", "reported_portfolio", "TEXT DEFAULT ''", None),
    ("edges", "telemetry_at", "REAL DEFAULT 0", None),
    ("events", "received_at", "REAL DEFAULT 0", "UPDATE events SET received_at = timestamp"),
)
# indexes on columns added after the first release, created once those columns exist
LATE_INDEXES = "CREATE INDEX IF NOT EXISTS events_by_arrival ON events (received_at);"
KEEP_WINDOWS_S = 6 * 3600.0  # telemetry history per edge (rollouts judge canaries on it)
KEEP_PROFILES = 16  # profiles kept per edge, the newest stored (`prunefleet cloud serve --keep-profiles`)
# a stored report larger than any valid one (an older coordinator stored it unchecked) is never read
MAX_ROW_BYTES = 16 << 10


def telemetry_statements(edge: str, t: coordinator_pb2.Telemetry, now: float) -> list[tuple[str, tuple]]:
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


def event_statement(edge: str, event: coordinator_pb2.SwitchEvent, now: float) -> tuple[str, tuple]:
    """Store an event once however often it is resent; `now` (the coordinator's clock) dates it for retention."""
    blob = event.SerializeToString()
    return (
        "INSERT INTO events (edge, timestamp, event, received_at) SELECT ?, ?, ?, ? WHERE NOT EXISTS "
        "(SELECT 1 FROM events WHERE timestamp = ? AND edge = ? AND event = ?)",
        (edge, event.timestamp, blob, now, event.timestamp, edge, blob),
    )


def pin_statements(edges: list[str], variant_id: str, now: float) -> list[tuple[str, tuple]]:
    """Pin `edges` to `variant_id`, or unpin them when it is ""."""
    if not variant_id:
        return [("DELETE FROM pins WHERE edge = ?", (e,)) for e in edges]
    sql = "INSERT OR REPLACE INTO pins (edge, variant_id, pinned_at) VALUES (?, ?, ?)"
    return [(sql, (e, variant_id, now)) for e in edges]


def profile_statement(edge: str, profile: coordinator_pb2.VariantProfile) -> tuple[str, tuple]:
    """One profile per edge and variant: a newer one replaces it (and is stored last: the highest rowid)."""
    return (
        "INSERT OR REPLACE INTO profiles (edge, variant_id, profile) VALUES (?, ?, ?)",
        (edge, profile.variant_id, profile.SerializeToString()),
    )


def keep_profiles_statement(edge: str, keep: int) -> tuple[str, tuple]:
    """Delete all but the `keep` profiles of `edge` stored last."""
    return (
        "DELETE FROM profiles WHERE edge = ? AND rowid NOT IN "
        "(SELECT rowid FROM profiles WHERE edge = ? ORDER BY rowid DESC LIMIT ?)",
        (edge, edge, keep),
    )


LISTING_VERSION, LISTING_EXPIRES = "listing_version", "listing_expires_at"  # settings: the listings issued last


def issue_statements(now: float, expires_at: int) -> list[tuple[str, tuple]]:
    """The next listing version and the expiry its listings carry, in the settings. The version is one
    above the last, and at least the unix second `now`: it rises even after the database is lost."""
    return [
        (
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = MAX(CAST(value AS INTEGER) + 1, CAST(excluded.value AS INTEGER))",
            (LISTING_VERSION, int(now)),
        ),
        ("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (LISTING_EXPIRES, str(int(expires_at)))),
    ]
