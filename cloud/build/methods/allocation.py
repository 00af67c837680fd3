"""Latency-aware allocation of channel removals (in the spirit of HALP, hardware-aware latency pruning).

Starting from the groups' current counts, every round looks at the next rung of each group's ladder
(`latency_table.channel_ladder`: the next multiple of the channel block below, or a halving at the
bottom), prices it as the importance its channels carry (the group's least important ones) over the
milliseconds the latency table says it saves across every layer the group shapes, and takes the
cheapest; rounds go on until the predicted latency is at the goal or nothing saves time any more.
A removal that saves nothing is never taken, so the blocks CPU kernels compute in are never split
for nothing. `goal_for` turns a served speedup into a goal of the table's own prediction, from the
models measured so far; `prune` removes the chosen channels with torch-pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cloud.build.compaction import channels
from cloud.build.methods.importance import Scores
from cloud.build.methods.latency_table import LatencyTable
from cloud.build.methods.topology import Topology

Ladder = Callable[[int], list[int]]
MIN_SLOPE, MAX_SLOPE = 0.5, 2.0  # bounds of the measured-over-predicted slope, relative to proportional
MAX_CUT = 0.25  # one correction lowers the predicted goal by at most this share of the last prediction
OVERSHOOT = 1.12  # an attempt measured this many times past its goal is pruned less again (`next_goal`)
CLOSE = 0.02  # attempts whose predictions are this close (relative) are not split further


def _costs(scores: Scores, weights: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """Per group, what removing its k least important channels costs (index k): the importance they
    hold; or, given `weights`, the group's weight times the log of its importance over what it keeps
    (a removal then costs its share of what the group still holds, whatever the scale of its scores)."""
    costs = {}
    for group, found in scores.items():
        removed = torch.cat([torch.zeros(1, dtype=torch.float64), found.double().sort().values.cumsum(0)])
        if weights is not None:
            total = float(removed[-1])
            tiny = 1e-12 * total if total > 0 else 1e-30
            removed = weights[group] * (math.log(total + tiny) - torch.log((total - removed).clamp(min=0) + tiny))
        costs[group] = removed
    return costs


def _weights(topology: Topology, table: LatencyTable, counts: dict[str, int]) -> dict[str, float]:
    """Each group's weight in the log objective: the time of the layers it shapes, at `counts`."""
    return {
        group: sum(table.layer_ms(n, *topology.shape(n, counts)) for n in topology.touching(group) if n in table.layers)
        for group in topology.groups
    }


def _saving(topology: Topology, table: LatencyTable, counts: dict[str, int], group: str, to: int) -> float:
    after = {**counts, group: to}
    return sum(
        table.layer_ms(name, *topology.shape(name, counts)) - table.layer_ms(name, *topology.shape(name, after))
        for name in topology.touching(group)
        if name in table.layers
    )


def _next_saving(
    topology: Topology, table: LatencyTable, counts: dict[str, int], group: str, rungs: list[int], floor: int
) -> tuple[int, float] | None:
    """The nearest count below the group's own, on its ladder and not below `floor`, that the table says
    saves time, and what it saves; None when none does. Looking one rung ahead only, a group whose next
    rung sits on a flat stretch of its layers' times (CPU kernels compute channels in blocks; the table
    samples its axes) would never shrink again, however much the rungs after it save: on VGG-11 the
    late 256-channel groups stayed at 208 to 224 channels while the first convolutions, cheap to begin
    with, were cut to 4 to 16."""
    for to in (c for c in rungs if floor <= c < counts[group]):
        saved = _saving(topology, table, counts, group, to)
        if saved > 1e-9:
            return to, saved
    return None


def allocate(
    topology: Topology,
    table: LatencyTable,
    scores: Scores,
    goal_ms: float,
    counts: dict[str, int],
    ladder: Ladder,
    log: bool = False,
    floors: dict[str, int] | None = None,
) -> dict[str, int]:
    """Channel counts per group, from `counts` down, until the predicted latency is at most `goal_ms`
    (or no removal saves time). `scores` rank each group's channels as the model has them now. A
    removal costs the importance it removes (HALP's knapsack, greedily), or with `log` the log of what
    its group keeps, weighted by the time of the layers the group shapes: with importance spread evenly
    and time growing with the counts, that keeps the widths in proportion (a uniform width multiplier),
    and it leaves them where the table or the importance says a group is cheaper to shrink. No group
    goes below its count in `floors` (`uniform_floors`)."""
    counts, floors = dict(counts), floors or {}
    costs = _costs(scores, _weights(topology, table, counts) if log else None)
    full = {g: len(s) for g, s in scores.items()}
    predicted = table.predict(topology, counts)
    while predicted > goal_ms:
        best, best_price = None, float("inf")
        for group in scores:
            step = _next_saving(topology, table, counts, group, ladder(full[group]), floors.get(group, 0))
            if step is None:
                continue
            to, saved = step
            lost = float(costs[group][full[group] - to] - costs[group][full[group] - counts[group]])
            price = lost / saved
            if price < best_price:
                best, best_price = (group, to, saved), price
        if best is None:
            break
        group, to, saved = best
        counts[group] = to
        predicted -= saved
    return counts


def _rung(ladder: Ladder, dense: int, wanted: float, now: int) -> int:
    """The smallest count of `dense`'s ladder that is at least `wanted`, and at most `now`."""
    return min(now, min((c for c in ladder(dense) if c >= wanted), default=dense))


def uniform_floors(
    topology: Topology, table: LatencyTable, dense: dict[str, int], goal_ms: float, ladder: Ladder, share: float
) -> dict[str, int]:
    """What each group keeps at least: `share` of its count in the widest uniform width multiplier of
    the dense model (`dense` counts, every group times the same u, up its ladder, at most its count now)
    that the table predicts at `goal_ms` or less; no floor where even the narrowest one is slower.
    Unbounded, `allocate` follows scores and table wherever they lead, and one timing of the table or
    one scoring can cut a group to a few channels while its neighbours stay whole; with a floor it
    shapes a model near a width multiplier and departs from it only where both say so (measured on
    VGG-11, two builds each: 3x variants -2.98 and -1.46 points without a floor, -2.08 and -0.14 with
    it at 0.75; see `structured`)."""
    now = topology.groups

    def counts(u: float) -> dict[str, int]:
        return {g: _rung(ladder, dense.get(g, c), u * dense.get(g, c), c) for g, c in now.items()}

    low, high = 0.0, 1.0
    if table.predict(topology, counts(low)) > goal_ms:
        return {}
    for _ in range(30):  # bisection to well below one channel of the widest group
        mid = (low + high) / 2
        low, high = (mid, high) if table.predict(topology, counts(mid)) <= goal_ms else (low, mid)
    return {g: _rung(ladder, dense.get(g, c), share * low * dense.get(g, c), c) for g, c in now.items()}


def floor_counts(topology: Topology, ladder: Ladder) -> dict[str, int]:
    """Every group at the bottom of its ladder: the fastest model the chain can reach."""
    return {g: ladder(c)[-1] for g, c in topology.groups.items()}


def goal_for(history: list[tuple[float, float]], goal_speedup: float, margin: float = 1.02) -> float:
    """The predicted milliseconds at which the served model should reach `goal_speedup` (times
    `margin`), from `history`: (predicted ms, measured latency relative to the dense model) of the
    models measured so far, latest last. Proportional through the last point when it is the only one;
    after that the secant through the last two, its slope bounded around proportional, and never more
    than `MAX_CUT` below the last prediction: a wrong measurement costs one small step of pruning more,
    not the model."""
    wanted = 1.0 / (goal_speedup * margin)
    predicted, relative = history[-1]
    proportional = predicted * wanted / relative
    if len(history) < 2 or history[-2][0] - predicted <= 1e-9:
        return proportional
    before, relative_before = history[-2]
    slope = (relative_before - relative) / (before - predicted)
    slope = min(max(slope, MIN_SLOPE * relative / predicted), MAX_SLOPE * relative / predicted)
    return max(predicted - (relative - wanted) / slope, (1.0 - MAX_CUT) * predicted)


def next_goal(
    parent: tuple[float, float], attempts: list[tuple[float, float]], goal_speedup: float, reaches
) -> float | None:
    """The predicted milliseconds of a step's next attempt, or None when it is done. `parent`: the
    parent's (predicted ms, measured latency relative to the dense model); `attempts`: (predicted ms,
    measured speedup) of the step's attempts so far; `reaches(speedup, goal)` says whether one counts.
    Until one reaches the goal: further down the secant (`goal_for`). Once one does: done, unless even
    the least pruned of those overshoots (measured past `OVERSHOOT` times the goal: a step can jump
    well past it, and every step too far costs accuracy), then halfway back toward the most pruned one
    that fell short (or the parent), until the two are `CLOSE`."""
    reached = [a for a in attempts if reaches(a[1], goal_speedup)]
    if not reached:
        return goal_for([parent, *((ms, 1.0 / speedup) for ms, speedup in attempts)], goal_speedup)
    least = max(reached)
    if least[1] <= OVERSHOOT * goal_speedup:
        return None
    upper = min((ms for ms, speedup in attempts if ms > least[0] and not reaches(speedup, goal_speedup)), default=None)
    upper = parent[0] if upper is None else upper
    return None if upper - least[0] <= CLOSE * least[0] else (least[0] + upper) / 2


def kept_attempt(attempts: list[tuple[float, float]], goal_speedup: float, reaches) -> int:
    """Which attempt a step keeps: the least pruned one that reaches the goal, else the last one (the
    most pruned)."""
    reached = [i for i, a in enumerate(attempts) if reaches(a[1], goal_speedup)]
    return max(reached, key=lambda i: attempts[i][0]) if reached else len(attempts) - 1


def prune(model: nn.Module, example: torch.Tensor, scores: Scores, counts: dict[str, int]) -> nn.Module:
    """Remove from `model`, in place, the least important channels of every group whose count in
    `counts` is below its own; groups are named as in `scores` (both from a trace of this model's
    structure)."""
    analysis = channels.analyse(channels.trace(model, example, None))
    for plan in analysis.plans:
        have = len(plan.group[0].idxs)
        keep = counts.get(plan.name, have)
        if keep >= have:
            continue
        drop = scores[plan.name].argsort()[: have - keep].sort().values.tolist()
        analysis.trace.graph.get_pruning_group(plan.root, plan.handler, drop).prune()
    return model.eval()
