"""The coordinator's report writer: edge reports stored by one thread, a tick's worth per transaction.

The event loop that holds the edges' streams never waits for SQLite: `put` only queues a report.
One writer thread takes everything queued, waits at most `tick_s` for more (up to `max_batch`), and
stores it with `FleetDB.record_reports` in one transaction; at 1000 edges reporting every second that
is one commit per tick instead of 1000 a second. A batch that fails to commit is tried again on the
next tick (the reports stay queued in order); after `attempts` failures it is counted in `dropped`
and logged. `flush` returns once everything queued before it is stored (operator reads call it, so
they see every report an edge sent before them), `close` stores what is left and stops.

A report the writer has not yet committed when the coordinator dies is lost here, but not for the
edge: its link sends again every window of a stream's last 10 s when the stream breaks, and the
database stores a repeated window or event once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud.service.fleet_db import FleetDB
from protos import coordinator_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterConfig:
    tick_s: float = 0.1  # longest a report waits for others to share its transaction
    max_batch: int = 5000  # reports per transaction
    attempts: int = 5  # commits tried before a batch is given up (and counted in `dropped`)

    def __post_init__(self) -> None:
        if not 0 < self.tick_s <= 5 or self.max_batch < 1 or self.attempts < 1:
            raise ValueError("tick_s must be in (0, 5], max_batch and attempts >= 1")


class ReportWriter:
    def __init__(
        self,
        db: FleetDB,
        config: WriterConfig | None = None,
        on_stored: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ):
        self._db, self._config = db, config or WriterConfig()
        self._on_stored, self._on_dropped = on_stored or (lambda n: None), on_dropped or (lambda n: None)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self.written = 0  # reports committed
        self.dropped = 0  # reports given up after `attempts` failed commits
        self.batches = 0  # transactions committed
        self._thread = threading.Thread(target=self._run, daemon=True, name="report-writer")
        self._thread.start()

    def put(self, report: coordinator_pb2.EdgeReport) -> None:
        """Queue one report; never blocks (safe on the event loop and from any thread)."""
        self._queue.put(report)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every report queued before this call is stored (or given up); False on timeout."""
        if self._stopped.is_set():
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Store what is queued, then stop the thread."""
        if not self._stopped.is_set():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def _take(self, first) -> tuple[list, list[threading.Event], bool]:
        """The batch starting with `first`: whatever arrives within a tick, up to `max_batch` reports."""
        reports, marks, stop = [], [], False
        deadline = time.monotonic() + self._config.tick_s
        item = first
        while True:
            if item is None:
                stop = True
            elif isinstance(item, threading.Event):
                marks.append(item)
            else:
                reports.append(item)
            if stop or len(reports) >= self._config.max_batch:
                return reports, marks, stop
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return reports, marks, stop

    def _store(self, reports: list) -> None:
        for attempt in range(1, self._config.attempts + 1):
            try:
                self._db.record_reports(reports)
                self.written += len(reports)
                self.batches += 1
                self._on_stored(len(reports))
                return
            except Exception:  # a locked or full disk: try again after a tick
                log.exception("storing %d edge reports failed (attempt %d)", len(reports), attempt)
                time.sleep(self._config.tick_s)
        self.dropped += len(reports)
        self._on_dropped(len(reports))
        log.error("gave up %d edge reports after %d attempts", len(reports), self._config.attempts)

    def _run(self) -> None:
        stop = False
        while not stop:
            reports, marks, stop = self._take(self._queue.get())
            if reports:
                self._store(reports)
            for mark in marks:
                mark.set()
        self._stopped.set()
