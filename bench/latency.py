"""Latency of models side by side: p50 at batch 1 and 32, in alternating rounds so every model sees the
same machine (a background burst slows all of them, not one). Each model is timed as an edge serves it
by default (BatchNorm folded, channels-last: common.inference) and as loaded (eager PyTorch, how an
edge serves with `--no-optimize-models`)."""

from __future__ import annotations

import copy
import statistics

from torch import nn

from common.inference import for_inference
from common.profiling import measure_latency


def paired(
    models: dict[str, nn.Module], shape: tuple, iters: int, rounds: int = 3, batches: tuple[int, ...] = (1, 32)
) -> dict[str, float]:
    """`{who}_b{batch}_ms` (as served) and `{who}_as_loaded_b{batch}_ms`: the median over `rounds` of
    each model's p50 over `iters` runs. The models themselves are left as they are."""
    forms: dict[str, nn.Module] = {}
    for who, model in models.items():
        forms[who] = for_inference(copy.deepcopy(model), tuple(shape))
        forms[f"{who}_as_loaded"] = model.eval()
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for who, model in forms.items():
            for batch in batches:
                samples.setdefault(f"{who}_b{batch}_ms", []).append(
                    measure_latency(model, shape, batch, iters=iters, warmup=2).p50_ms
                )
    return {key: statistics.median(values) for key, values in samples.items()}
