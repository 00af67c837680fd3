"""On-device latency of several variants, measured interleaved.

Timing variants one after another lets a burst of load elsewhere on the device land on one of them
and reorder variants whose true latencies differ by a few percent. Round-robin timing (one forward
pass of each variant per round) spreads such bursts evenly, so the ranking the policy relies on holds.

Each variant is timed through its `forward` (`edge.variants.LoadedVariant`: pixels in [0, 1] to logits,
normalization included), what a request costs it whatever the backend; this module imports no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from common.profiling import LatencyProfile

Forward = Callable[[np.ndarray], object]


def profile_interleaved(
    models: Mapping[str, tuple[Forward, tuple[int, ...]]], batch: int, iters: int, warmup: int = 5, seed: int = 0
) -> dict[str, LatencyProfile]:
    """Latency of each forward (keyed by id, with its [C, H, W] input shape) on random batches of
    `batch` pixels in [0, 1]."""
    if iters < 1 or batch < 1 or warmup < 0:
        raise ValueError("iters and batch must be >= 1 and warmup >= 0")
    rng = np.random.default_rng(seed)
    inputs = {key: rng.random((batch, *shape), dtype=np.float32) for key, (_, shape) in models.items()}
    timings: dict[str, list[float]] = {key: [] for key in models}
    for key, (forward, _) in models.items():
        for _ in range(warmup):
            forward(inputs[key])
    for _ in range(iters):
        for key, (forward, _) in models.items():
            start = time.perf_counter()
            forward(inputs[key])
            timings[key].append((time.perf_counter() - start) * 1e3)
    return {key: _summary(batch, np.asarray(samples)) for key, samples in timings.items()}


def _summary(batch: int, samples_ms: np.ndarray) -> LatencyProfile:
    p50, p95 = np.percentile(samples_ms, [50, 95])
    return LatencyProfile(batch, float(p50), float(p95), float(samples_ms.mean()))
