"""How the `structured` chain measures a served speedup, and when a measurement reaches a goal.

Both models are served as an edge serves them (`common.inference.for_inference`: BatchNorm folded,
channels-last) and timed in interleaved rounds (`common.profiling.measure_interleaved`) at the
latency batch. The figure is built to hold on a machine shared with other work (see `speedup`).
"""

from __future__ import annotations

import copy
import logging
import time

from torch import nn

from common.inference import for_inference
from common.profiling import measure_interleaved

log = logging.getLogger(__name__)
MEASUREMENTS = 3  # interleaved measurements behind one speedup (their median)
ITERS, ROUNDS = 5, 10  # runs per round (the first after a switch finds the caches cold) and rounds
REACH = 1.03  # a goal counts as reached when measured this much past it (measurements differ by a few %)
TABLE_SLACK = 1.15  # a served speedup is at most this many times the latency table's
BUSY, PAUSE_S = 1.6, 2.0  # a dense model served over BUSY times its table time: measured again after a pause


def reaches(speedup: float, goal: float) -> bool:
    """Whether a measured speedup counts as reaching `goal`: by `REACH`, the noise of one measurement
    against the next."""
    return speedup >= REACH * goal


def copy_of(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def speedup(dense: nn.Module, model: nn.Module, shape: tuple, batch: int, table: tuple[float, float]) -> float:
    """How many times faster `model` runs than `dense`, both as served: the median of `MEASUREMENTS`
    interleaved measurements, each comparing the two at their lower quartiles over rounds,
    and never more than `TABLE_SLACK` times what the latency table predicts (`table`: the dense
    model's and this model's predicted ms).

    Other work on a shared machine only adds time, and it adds more to long runs than to short ones (a
    preempted thread stalls a whole pass), so under load a plain ratio misstates the speedup of a
    small model, sometimes many times over. The lower quartile is the steadier figure (on a quiet
    machine the median's neighbour); a measurement whose dense model ran over `BUSY` times its table
    time was taken on a busy machine and is taken again after a pause (the busy ones count only when
    no other comes); the median drops a burst that landed on one measurement; and the table, timed
    layer by layer on the least of several runs, bounds the rest: the served model has the table's
    layers plus work pruning shrinks less (pools, activations, the calls themselves)."""
    quiet, busy = [], []
    for _ in range(MEASUREMENTS * 3):
        spread = measure_interleaved({"dense": dense, "model": model}, shape, batch, iters=ITERS, rounds=ROUNDS)
        ratio = spread["dense"].q1_ms / spread["model"].q1_ms
        if spread["dense"].q1_ms > BUSY * table[0]:
            busy.append(ratio)
            time.sleep(PAUSE_S)
            continue
        quiet.append(ratio)
        if len(quiet) == MEASUREMENTS:
            break
    found = sorted(quiet or busy)
    if not quiet:
        log.warning("the machine stayed busy: the dense model ran over %gx its table time in every measurement", BUSY)
    return min(found[len(found) // 2], TABLE_SLACK * table[0] / table[1])


def measure(dense: nn.Module, model: nn.Module, shape: tuple, batch: int, table: tuple[float, float]) -> float:
    """`speedup` of two models as loaded, each made ready to serve as an edge serves it first."""
    served = (for_inference(copy_of(m), shape) for m in (dense, model))
    return speedup(*served, shape, batch, table)
