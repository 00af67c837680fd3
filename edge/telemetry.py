"""A thread-safe window of request outcomes, closed once per policy window, and process statistics."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil


@dataclass(frozen=True)
class WindowStats:
    requests: int  # answered and failed
    errors: int
    rate: float  # requests per second over the window
    p50_ms: float  # latency percentiles of the answered requests; 0 when none was
    p95_ms: float
    p99_ms: float
    seconds: float = 0.0  # how long the window was open


class RequestWindow:
    """Latencies of the requests since the window opened. Failed requests count, but their (short)
    latencies stay out of the percentiles. At most `max_samples` latencies are kept per window."""

    def __init__(self, started_at: float, max_samples: int = 100_000):
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._requests = 0
        self._errors = 0
        self._max = max_samples
        self._started_at = started_at
        self._arrived = 0

    def arrive(self) -> None:
        """A request came (counted before it is decoded, queued or answered)."""
        with self._lock:
            self._arrived += 1

    @property
    def arrived(self) -> int:
        """Requests that came since the window was made: a running total, never reset."""
        return self._arrived

    def record(self, latency_s: float, variant_id: str, ok: bool) -> None:
        """One request's outcome; `variant_id` is the variant that answered ("" when none did)."""
        with self._lock:
            self._requests += 1
            if not ok:
                self._errors += 1
            elif len(self._latencies) < self._max:
                self._latencies.append(latency_s)

    def close_window(self, now: float) -> WindowStats:
        """Statistics of the window that ends now; a new window starts."""
        with self._lock:
            latencies, requests, errors = self._latencies, self._requests, self._errors
            started, self._started_at = self._started_at, now
            self._latencies, self._requests, self._errors = [], 0, 0
        seconds = max(now - started, 1e-6)
        rate = requests / seconds
        if not latencies:
            return WindowStats(requests, errors, rate, 0.0, 0.0, 0.0, seconds)
        p50, p95, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 95, 99])
        return WindowStats(requests, errors, rate, float(p50), float(p95), float(p99), seconds)


class ProcessStats:
    """CPU percent of this process since the previous sample, and its resident memory; and how busy the
    device was (every process) since the previous `device_busy`. The device is the CPUs this process
    may run on (its affinity): an agent pinned to some cores of a bigger machine, as the cluster and
    the policy benchmark place it, is judged by those cores alone, not by load elsewhere."""

    def __init__(self, process: psutil.Process | None = None, cpus: Sequence[int] | None = None):
        self._process = process or psutil.Process()
        self._process.cpu_percent(None)
        self._cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        if not self._cpus:
            raise ValueError("the device needs at least one CPU")
        self.cores = len(self._cpus)
        psutil.cpu_percent(None, percpu=True)

    def device_busy(self) -> float:
        """Share of the device's CPU time in use, all processes, since the previous call (0 to 1)."""
        per_cpu = psutil.cpu_percent(None, percpu=True)
        busy = [per_cpu[c] for c in self._cpus if c < len(per_cpu)]
        return min(1.0, max(0.0, sum(busy) / max(len(busy), 1) / 100.0))

    def sample(self) -> tuple[float, int]:
        return float(self._process.cpu_percent(None)), int(self._process.memory_info().rss)
