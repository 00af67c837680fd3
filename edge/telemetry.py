"""A thread-safe window of request outcomes, closed once per policy window."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import psutil


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


class RequestWindow:
    def __init__(self, started_at: float, max_samples: int = 100_000):
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._errors = 0
        self._dropped = 0
        self._max = max_samples
        self._started_at = started_at

    def record(self, latency_s: float, ok: bool) -> None:
        with self._lock:
            if not ok:
                self._errors += 1
            elif len(self._latencies) < self._max:
                self._latencies.append(latency_s)
            else:
                self._dropped += 1

    def close(self, now: float) -> WindowStats:
        """Statistics of the window that ends now; a new window starts."""
        with self._lock:
            latencies, errors, dropped = self._latencies, self._errors, self._dropped
            started, self._started_at = self._started_at, now
            self._latencies, self._errors, self._dropped = [], 0, 0
        requests = len(latencies) + dropped + errors
        rate = requests / max(now - started, 1e-6)
        if not latencies:
            return WindowStats(requests, errors, rate, 0.0, 0.0, 0.0)
        p50, p95, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 95, 99])
        return WindowStats(requests, errors, rate, float(p50), float(p95), float(p99))


class ProcessStats:
    """CPU percent since the previous call and resident memory of this process."""

    def __init__(self):
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def sample(self) -> tuple[float, int]:
        return self._process.cpu_percent(None), self._process.memory_info().rss
