"""Retention: what the fleet database keeps, by the coordinator's clock, so it stops growing.

    profiles   the newest `keep_profiles` per edge (one per variant; a newer one replaces it), on write
               (`FleetDB.record_reports`) and again by `prune` for what was stored before the bound
    events     an event goes once it is older than `event_retention_days` (by when the coordinator
               stored it, not by the edge's clock), or once `max_events` newer ones are stored
    edges      an edge not seen (registered, or reporting) for `edge_retention_days`, not connected,
               and not covered by a rollout in its canary phase goes, with its profiles, telemetry
               windows and pin; if it comes back it registers as a new edge
    windows    as before: six hours per edge, on write

`Retention` runs `prune` every `prune_every_s` on a thread of its own. It deletes in small
transactions (`BATCH` rows each), so the report writer, which shares the database, waits at most one
of them; reports themselves are queued without waiting (`cloud.service.report_writer`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloud.service.fleet_db import FleetDB
from cloud.service.fleet_schema import KEEP_PROFILES
from cloud.service.rollout import CANARY

log = logging.getLogger(__name__)
DAY_S = 86_400.0
BATCH = 2000  # rows deleted per transaction


@dataclass(frozen=True)
class RetentionConfig:
    """How much of the fleet's history the coordinator keeps (flags of `prunefleet cloud serve`)."""

    keep_profiles: int = KEEP_PROFILES  # per edge, the newest stored
    event_retention_days: float = 30.0  # switch events older than this go
    max_events: int = 1_000_000  # and beyond this many, the oldest go
    edge_retention_days: float = 30.0  # an edge not seen for this long (and holding no rollout) goes
    prune_every_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.keep_profiles <= 1024:
            raise ValueError(f"keep_profiles must be in [1, 1024], got {self.keep_profiles}")
        if not 1_000 <= self.max_events <= 10**9:
            raise ValueError(f"max_events must be in [1000, 1e9], got {self.max_events}")
        for name in ("event_retention_days", "edge_retention_days"):
            if not 0.0001 <= getattr(self, name) <= 36_500:  # about 9 s to 100 years
                raise ValueError(f"{name} must be in [0.0001, 36500], got {getattr(self, name)}")
        if not 0.05 <= self.prune_every_s <= DAY_S:
            raise ValueError(f"prune_every_s must be in [0.05, {DAY_S:g}], got {self.prune_every_s}")


@dataclass(frozen=True)
class Pruned:
    """Rows one `prune` deleted."""

    events: int = 0
    edges: int = 0
    profiles: int = 0


def _delete_in_batches(db: FleetDB, select_ids: str, args: tuple, table: str, key: str = "id") -> int:
    """Delete the rows of `table` whose `key` `select_ids` selects, `BATCH` per transaction."""
    deleted = 0
    while ids := [row[0] for row in db.query(f"{select_ids} LIMIT {BATCH}", args)]:
        marks = ",".join("?" * len(ids))
        db.transaction([(f"DELETE FROM {table} WHERE {key} IN ({marks})", tuple(ids))])
        deleted += len(ids)
        if len(ids) < BATCH:
            break
    return deleted


def _events(db: FleetDB, config: RetentionConfig, now: float) -> int:
    cutoff = now - config.event_retention_days * DAY_S
    old = _delete_in_batches(db, "SELECT id FROM events WHERE received_at < ?", (cutoff,), "events")
    newest_dropped = db.query("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (config.max_events,))
    if not newest_dropped:
        return old
    return old + _delete_in_batches(db, "SELECT id FROM events WHERE id <= ?", (newest_dropped[0][0],), "events")


def _edges(db: FleetDB, config: RetentionConfig, now: float, connected: set[str]) -> int:
    cutoff = now - config.edge_retention_days * DAY_S
    rows = db.query(
        "SELECT name FROM edges WHERE last_seen < ? AND name NOT IN (SELECT e.edge FROM rollout_edges e "
        "JOIN rollouts r ON r.id = e.rollout_id WHERE r.state = ?)",
        (cutoff, CANARY),
    )
    departed = [name for (name,) in rows if name not in connected]
    for start in range(0, len(departed), BATCH):
        names = departed[start : start + BATCH]
        marks = ",".join("?" * len(names))
        tables = (("edges", "name"), ("profiles", "edge"), ("windows", "edge"), ("pins", "edge"))
        db.transaction([(f"DELETE FROM {table} WHERE {column} IN ({marks})", tuple(names)) for table, column in tables])
    return len(departed)


def _profiles(db: FleetDB, config: RetentionConfig) -> int:
    select = (
        "SELECT row_id FROM (SELECT rowid AS row_id, ROW_NUMBER() OVER (PARTITION BY edge ORDER BY rowid DESC) AS n "
        "FROM profiles) WHERE n > ?"
    )
    return _delete_in_batches(db, select, (config.keep_profiles,), "profiles", key="rowid")


def prune(db: FleetDB, config: RetentionConfig, now: float, connected: set[str] = frozenset()) -> Pruned:
    """Delete what `config` no longer keeps, as of `now` (the coordinator's clock); `connected` edges
    stay whenever they were last seen."""
    return Pruned(_events(db, config, now), _edges(db, config, now, connected), _profiles(db, config))


class Retention:
    """`prune` every `prune_every_s` on its own thread until `stop`; a failed pass is logged and retried."""

    def __init__(self, db: FleetDB, config: RetentionConfig, connected: Callable[[], set[str]]):
        self._db, self._config, self._connected = db, config, connected
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="retention")

    def start(self) -> Retention:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.wait(self._config.prune_every_s):
            try:
                pruned = prune(self._db, self._config, self._db.clock(), self._connected())
            except Exception:  # a locked or full disk: the next pass tries again
                log.exception("pruning the fleet database failed")
                continue
            if pruned != Pruned():
                log.info(
                    "retention: %d events, %d departed edges, %d profiles deleted",
                    pruned.events,
                    pruned.edges,
                    pruned.profiles,
                )
