"""CPU latency and MACs, shared by the cloud (manifest, benchmarks) and the edge (on-device profile), and
the name of the CPU they were measured on.

torch is imported where a model is timed, so `LatencyProfile` and `cpu_model` need no torch.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import PrunefleetError

if TYPE_CHECKING:
    from torch import nn

CPUINFO = Path("/proc/cpuinfo")
# Rounds of an interleaved measurement by default: enough that the quartiles over rounds are stable, so
# two models whose quartiles overlap can be called equally fast instead of ranked by a burst of noise.
DEFAULT_ROUNDS = 15
MIN_ROUNDS = 4  # fewer rounds leave no quartiles to speak of


class ProfilingError(PrunefleetError, ValueError):
    """A latency measurement asked for with settings that cannot give one."""


@dataclass(frozen=True)
class LatencyProfile:
    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


@dataclass(frozen=True)
class LatencySpread:
    """One model's latency over the rounds of an interleaved measurement: the median round and the
    quartiles of the rounds (each round's figure is the median of its `iters` timed runs)."""

    batch: int
    p50_ms: float
    q1_ms: float
    q3_ms: float
    rounds: int

    def __post_init__(self) -> None:
        if not self.q1_ms <= self.p50_ms <= self.q3_ms:
            raise ProfilingError(f"p50 {self.p50_ms} ms lies outside its quartiles {self.q1_ms}..{self.q3_ms} ms")

    def overlaps(self, other: LatencySpread) -> bool:
        """Whether the two quartile ranges meet: the measurement cannot tell which model is faster."""
        return self.q1_ms <= other.q3_ms and other.q1_ms <= self.q3_ms


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's marketing name, for figure titles and benchmark metadata: Linux's "model name" line,
    else what the platform module knows (which is often only the architecture)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, iters: int = 30, warmup: int = 5
) -> LatencyProfile:
    """Time `iters` forward passes of a random batch after `warmup` untimed ones."""
    import torch

    if iters <= 0 or batch <= 0:
        raise ProfilingError("iters and batch must be positive")
    x = torch.randn(batch, *input_shape)
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        arr = np.asarray(_timed_runs(model, x, iters))
    return LatencyProfile(batch, float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), float(arr.mean()))


def measure_interleaved(
    models: Mapping[str, nn.Module],
    input_shape: tuple[int, ...],
    batch: int,
    iters: int = 5,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = 2,
) -> dict[str, LatencySpread]:
    """Latency of several models on the same batch, measured in rounds: every round times each model
    for `iters` runs, and the order reverses from one round to the next.

    Timed one after another, a burst of load elsewhere on the machine lands on one model and reorders
    models whose true latencies are close; interleaved, every model sees the same machine, and each
    round's position advantage (caches warmed by the previous model) alternates. The quartiles over
    rounds say how far to trust a ranking: overlapping quartiles mean a tie.
    """
    import torch

    if not models:
        raise ProfilingError("no models to time")
    if iters < 1 or batch < 1 or warmup < 0:
        raise ProfilingError(f"iters and batch must be >= 1 and warmup >= 0, got {iters}, {batch}, {warmup}")
    if rounds < MIN_ROUNDS:
        raise ProfilingError(f"at least {MIN_ROUNDS} rounds are needed for quartiles, got {rounds}")
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    names = list(models)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            models[name].eval()
            for _ in range(warmup):
                models[name](x)
        for index in range(rounds):
            for name in names if index % 2 == 0 else reversed(names):
                per_round[name].append(float(np.median(_timed_runs(models[name], x, iters))))
    return {name: _spread(batch, per_round[name]) for name in names}


def _timed_runs(model: nn.Module, x, iters: int) -> list[float]:
    """Milliseconds of each of `iters` forward passes (the caller holds inference mode)."""
    timings = []
    for _ in range(iters):
        start = time.perf_counter()
        model(x)
        timings.append((time.perf_counter() - start) * 1e3)
    return timings


def _spread(batch: int, rounds_ms: list[float]) -> LatencySpread:
    q1, p50, q3 = (float(v) for v in np.percentile(np.asarray(rounds_ms), [25, 50, 75]))
    return LatencySpread(batch, min(max(p50, q1), q3), q1, q3, len(rounds_ms))  # clamped against rounding


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of conv and linear layers for one input (as the layers are shaped)."""
    import torch
    from torch import nn

    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return total
