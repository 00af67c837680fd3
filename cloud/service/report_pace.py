"""Per-identity report pacing: no edge, honest or not, makes the coordinator handle more than a stated
rate of its reports.

Each identity (the edge's certificate name, or the name it reports under in plaintext) has a token
bucket: `rate` reports a second, `burst` at once. A report over it is not refused but waited for:
the stream's coroutine sleeps until the report's turn before reading the next one, so gRPC's flow
control slows the sender down and nothing is lost. Refusing would cost honest edges their history: an
edge back from an hour offline sends its buffered telemetry windows (up to 3,600) and switch events
at once, and closing its stream would make it send them all again. A flooding edge gets `rate` a
second of the coordinator's time and no more, and a second stream of the same identity shares the
same bucket (and replaces the first anyway: `cloud.service.edge_streams`).

The buckets of identities not heard from for `IDLE_S` are dropped, so the table holds only the edges
that report now.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

IDLE_S = 600.0  # a bucket unused this long is full again anyway: dropped


@dataclass(frozen=True)
class PaceConfig:
    """The rate each identity's reports are handled at (flags of `prunefleet cloud serve`)."""

    rate: float = 50.0  # reports a second; an edge at the shortest telemetry window sends about 10
    burst: int = 200  # reports handled at once before pacing starts

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.burst < 1:
            raise ValueError(
                f"report pacing needs a positive rate (--report-rate) and a burst of at least 1 (--report-burst), "
                f"got {self.rate:g} and {self.burst}"
            )


class ReportPace:
    """Token buckets by identity; `delay` says how long a report must wait for its turn, and calls
    `on_paced` for every report that has to wait (the cloud counts them in a metric). Thread-safe."""

    def __init__(
        self,
        config: PaceConfig = PaceConfig(),
        clock: Callable[[], float] = time.monotonic,
        on_paced: Callable[[], None] = lambda: None,
    ):
        self._config, self._clock, self._on_paced = config, clock, on_paced
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when counted)
        self._swept = clock()

    def delay(self, identity: str) -> float:
        """Seconds the next report of `identity` waits before it is handled (0: at once); it takes
        its token now, so reports queued behind it wait their own turn after it."""
        rate, burst = self._config.rate, self._config.burst
        with self._lock:
            now = self._clock()
            self._sweep(now)
            tokens, then = self._buckets.get(identity, (float(burst), now))
            tokens = min(float(burst), tokens + (now - then) * rate) - 1.0
            self._buckets[identity] = (tokens, now)
            if tokens >= 0:
                return 0.0
        self._on_paced()  # a report had to wait
        return -tokens / rate

    def _sweep(self, now: float) -> None:
        if now - self._swept < IDLE_S:
            return
        self._swept = now
        for identity in [i for i, (_, then) in self._buckets.items() if now - then > IDLE_S]:
            del self._buckets[identity]

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)
