"""Latency of models side by side at batch 1 and 32, interleaved in rounds so every model sees the same
machine (a background burst slows all of them, not one). Each model is timed as an edge serves it by
default (BatchNorm folded, channels-last: common.inference) and as loaded (eager PyTorch, how an edge
serves with `--no-optimize-models`)."""

from __future__ import annotations

import copy

from torch import nn

from common.inference import for_inference
from common.profiling import MIN_ROUNDS, measure_interleaved


def paired(
    models: dict[str, nn.Module], shape: tuple, iters: int, rounds: int = 8, batches: tuple[int, ...] = (1, 32)
) -> dict[str, float]:
    """`{who}_b{batch}_ms` (as served) and `{who}_as_loaded_b{batch}_ms`: each form's median over
    `rounds` interleaved rounds of its p50 over `iters` runs, with the rounds' quartiles beside it
    (`..._q1_ms`, `..._q3_ms`) so a reader can tell a ranking from noise. The models themselves are
    left as they are."""
    forms: dict[str, nn.Module] = {}
    for who, model in models.items():
        forms[who] = for_inference(copy.deepcopy(model), tuple(shape))
        forms[f"{who}_as_loaded"] = model.eval()
    out: dict[str, float] = {}
    for batch in batches:
        spreads = measure_interleaved(forms, tuple(shape), batch, iters=iters, rounds=max(rounds, MIN_ROUNDS))
        for who, spread in spreads.items():
            out[f"{who}_b{batch}_ms"] = spread.p50_ms
            out[f"{who}_b{batch}_q1_ms"] = spread.q1_ms
            out[f"{who}_b{batch}_q3_ms"] = spread.q3_ms
    return out
