"""CPU latency and MACs, shared by the cloud (manifest, benchmarks) and the edge (on-device profile)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LatencyProfile:
    batch: int
    p50_ms: float
    p95_ms: float
    mean_ms: float


def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch: int, iters: int = 30, warmup: int = 5
) -> LatencyProfile:
    """Time `iters` forward passes of a random batch after `warmup` untimed ones."""
    if iters <= 0 or batch <= 0:
        raise ValueError("iters and batch must be positive")
    x = torch.randn(batch, *input_shape)
    model.eval()
    timings = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            timings.append((time.perf_counter() - start) * 1e3)
    arr = np.asarray(timings)
    return LatencyProfile(batch, float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), float(arr.mean()))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of conv and linear layers for one input (as the layers are shaped)."""
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
