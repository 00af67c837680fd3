"""Channel importance per channel group: what the `structured` method loses by removing a channel.

Every scorer gives one number per channel of each group, summed over all the parameters the channel
owns across the group (its filters in the writers, its BatchNorm entries, its input columns in the
readers), because the group loses them together:

- `l2`: the group's squared L2 norm per channel (group magnitude, as in DepGraph);
- `bn`: the absolute BatchNorm scale (network slimming); a group with no BatchNorm falls back to `l2`;
- `taylor`: the first-order Taylor estimate of the loss change when the channel is removed, squared
  per batch and averaged over batches (Molchanov et al. 2019, group form).

How groups compare is a separate choice (`NORMALIZATIONS`): `share` divides each group's scores by
their sum (a channel's share of its group: every group weighs the same, and a narrow group's channels
each weigh more than a wide one's); `mean` by their mean (DepGraph's, so every channel weighs about 1
wherever it is); `none` keeps them as they are (comparable only for `taylor`, in units of the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from cloud.build.compaction import channels
from cloud.build.compaction.channel_values import BATCHNORM, LAYERS, is_depthwise

Scores = dict[str, torch.Tensor]  # group name -> one score per channel (float64, CPU)


def _parts(item, graph, scales_only: bool) -> list[tuple[torch.Tensor, int]]:
    """The parameters a group item holds per channel, and the dimension its indices run along (only
    BatchNorm scales with `scales_only`)."""
    module = item.dep.target.module
    if isinstance(module, BATCHNORM):
        return [(p, 0) for p in ((module.weight,) if scales_only else (module.weight, module.bias)) if p is not None]
    if scales_only:
        return []
    if type(module) not in LAYERS:
        return []
    if graph.is_out_channel_pruning_fn(item.dep.handler):
        return [(p, 0) for p in (module.weight, module.bias) if p is not None]
    return [] if is_depthwise(module) else [(module.weight, 1)]


def _per_channel(
    plan: channels.GroupPlan, graph, value: Callable[[torch.Tensor], torch.Tensor], scales_only: bool = False
) -> torch.Tensor:
    """Sum over the group's items of `value(parameter)` reduced to one number per root channel."""
    count = len(plan.group[0].idxs)
    total = torch.zeros(count, dtype=torch.float64)
    seen = set()
    for item in plan.group.items:
        for param, dim in _parts(item, graph, scales_only):
            key = (id(param), dim)
            if key in seen:
                continue
            seen.add(key)
            per_index = value(param).detach().double().cpu()
            per_index = per_index.transpose(0, dim).flatten(1).sum(1) if per_index.dim() > 1 else per_index
            idxs = torch.tensor(list(item.idxs), dtype=torch.long)
            roots = torch.tensor(list(item.root_idxs), dtype=torch.long)
            total.index_add_(0, roots, per_index[idxs])
    return total


def _share(scores: torch.Tensor) -> torch.Tensor:
    total = float(scores.sum())
    return scores / total if total > 0 else torch.full_like(scores, 1.0 / len(scores))


def _mean(scores: torch.Tensor) -> torch.Tensor:
    return _share(scores) * len(scores)


NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "share": _share,
    "mean": _mean,
    "none": lambda s: s,
}


def normalized(scores: Scores, how: str) -> Scores:
    """`scores` with every group normalized as `how` says (a key of `NORMALIZATIONS`)."""
    return {group: NORMALIZATIONS[how](s) for group, s in scores.items()}


def l2(analysis: channels.Analysis, **_) -> Scores:
    graph = analysis.trace.graph
    return {p.name: _per_channel(p, graph, torch.square) for p in analysis.plans}


def batchnorm(analysis: channels.Analysis, **_) -> Scores:
    graph, scores = analysis.trace.graph, {}
    for plan in analysis.plans:
        found = _per_channel(plan, graph, torch.abs, scales_only=True)
        scores[plan.name] = found if float(found.sum()) > 0 else _per_channel(plan, graph, torch.square)
    return scores


def taylor(analysis: channels.Analysis, model: nn.Module, batches: Iterable, device: torch.device, **_) -> Scores:
    """Mean over `batches` of (sum over the channel's parameters of weight * gradient)^2."""
    graph = analysis.trace.graph
    scores = {p.name: torch.zeros(len(p.group[0].idxs), dtype=torch.float64) for p in analysis.plans}
    model.to(device).eval()
    seen = 0
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(model(inputs.to(device)), labels.to(device)).backward()
        for plan in analysis.plans:
            first_order = _per_channel(plan, graph, lambda w: w.detach() * w.grad if w.grad is not None else w * 0)
            scores[plan.name] += first_order.cpu() ** 2
        seen += 1
    model.zero_grad(set_to_none=True)
    model.cpu()
    if not seen:
        raise ValueError("taylor importance needs at least one batch")
    return {name: s / seen for name, s in scores.items()}


IMPORTANCES: dict[str, Callable[..., Scores]] = {"l2": l2, "bn": batchnorm, "taylor": taylor}
NEEDS_DATA = frozenset({"taylor"})
