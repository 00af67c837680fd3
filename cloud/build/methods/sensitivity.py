"""Reconvene's structuring step: the sensitivity evaluator and the layer rectifier.

Given an unstructured pruning-at-init mask over a dense model:
1. the **sensitivity evaluator** looks at each channel group (the layers that lose a channel together,
   from `cloud.build.compaction.channels`: a conv with its BatchNorm, a residual stage, ...). A group
   is insensitive to structured pruning when every layer writing it keeps less than `threshold` of
   its weights and the channels it would keep (step 2) hold at least `coverage` of its surviving
   weights: where the mask spreads its weights over many channels, a few dense channels would drop
   most of what it kept;
2. an insensitive group keeps as many channels as its writers' unstructured budget supports (the
   surviving weights divided by what one output channel costs, given the inputs its own input group
   keeps), never more than have a surviving weight, chosen by surviving score mass; the other
   channels' filters and BatchNorm entries are zeroed and the project's surgery removes them, with its
   equivalence check. Surgery also removes the dead channels (no surviving weight) of masked groups;
3. the **layer rectifier** re-initializes every layer whose shape the structured pruning changed (the
   writers and readers of a shrunk group) with its own fan-in-correct initialization
   (`reset_parameters` on the new shape); a layer reshaped only by dead channels keeps its weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from cloud.build.compaction import channels, surgery
from cloud.build.methods import scorers
from cloud.build.methods.masks import Masks
from cloud.build.train import apply_masks
from common.models import prunable_layers

# Defaults of `reconvene`'s settings. The threshold separates the layers a PaI mask leaves nearly empty
# (where a few dense channels cost what the mask kept) from those it keeps dense enough that shrinking
# them loses accuracy; the coverage keeps a group masked when the channels its budget buys would drop
# most of what the mask kept there. `prunefleet bench reconvene` sweeps both.
DEFAULT_THRESHOLD = 0.05
MIN_COVERAGE = 0.8


@dataclass(frozen=True)
class GroupDecision:
    group: str  # the group's root layer
    writers: tuple[str, ...]
    density: float  # surviving weights / weights, over the writers
    channels: int
    kept: int  # channels kept (all of them when the group stays unstructured)
    insensitive: bool  # pruned structurally: dense within the channels it keeps
    reason: str


@dataclass(frozen=True, eq=False)
class _Group:
    """A channel group as the evaluator sees it: its writers' masks and, per channel, the surviving
    weights (`count`) and the surviving score (`mass`) over all its writers."""

    name: str
    members: channels.Members
    writers: tuple[tuple[nn.Module, str, torch.Tensor, torch.Tensor], ...]  # (layer, name, root rows, mask)
    count: torch.Tensor
    mass: torch.Tensor

    @property
    def channels(self) -> int:
        return self.members.channels

    @property
    def alive(self) -> int:
        """Channels with a surviving weight in some writer (at least one is always kept)."""
        return max(1, int((self.count > 0).sum()))

    @property
    def density(self) -> float:
        masks = [mask for *_, mask in self.writers]
        return sum(int(mask.sum()) for mask in masks) / max(1, sum(mask.numel() for mask in masks))


def _layer_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in prunable_layers(model).items()}


def _insensitive(weights: list[torch.Tensor], threshold: float) -> bool:
    return bool(weights) and all(float(mask.float().mean()) < threshold for mask in weights)


def _groups(model: nn.Module, masks: Masks, scores: scorers.Scores, analysis: channels.Analysis) -> list[_Group]:
    names = _layer_names(model)
    groups = []
    for plan in analysis.plans:
        found = channels.members(plan, analysis.trace.graph)
        writers = tuple((m, names[m], rows, masks[f"{names[m]}.weight"]) for m, rows in found.writers if m in names)
        count = torch.zeros(found.channels, dtype=torch.float64)
        mass = torch.zeros(found.channels, dtype=torch.float64)
        for _, name, rows, mask in writers:
            count += mask.flatten(1).sum(1).double()[rows]
            mass += (scores[f"{name}.weight"].double() * mask).flatten(1).sum(1)[rows]
        groups.append(_Group(plan.name, found, writers, count, mass))
    return groups


def _budget(group: _Group, source: dict[nn.Module, str], share: dict[str, float]) -> int:
    """Channels the writers' surviving weights pay for: one channel costs a filter over the inputs the
    writer's input group keeps; never more than the group has alive."""
    needed = max(
        math.ceil(int(mask.sum()) / (mask[0].numel() * (share[source[m]] if m in source else 1.0)))
        for m, _, _, mask in group.writers
    )
    return max(1, min(group.channels, needed, group.alive))


def _covered(group: _Group, kept: int, coverage: float) -> bool:
    """Whether the `kept` channels of most score mass hold `coverage` of the group's surviving weights."""
    top = torch.topk(group.mass, kept, sorted=False).indices
    return float(group.count[top].sum()) >= coverage * float(group.count.sum())


def _settle(
    groups: list[_Group], sparse: set[str], source: dict[nn.Module, str], coverage: float
) -> tuple[dict[str, int], set[str]]:
    """Channels kept per group and the groups shrunk, iterated to a fixed point: a group's budget
    depends on how many channels its writers' input groups keep."""
    insensitive = set(sparse)
    counts = {g.name: g.channels for g in groups}
    share = {g.name: g.alive / g.channels for g in groups}  # a masked group loses its dead channels too
    for _ in range(2 * len(groups) + 2):
        before = (dict(counts), set(insensitive))
        for group in groups:
            if group.name in insensitive:
                kept = _budget(group, source, share)
                if _covered(group, kept, coverage):
                    counts[group.name], share[group.name] = kept, kept / group.channels
                    continue
                insensitive.discard(group.name)  # shrinking it would drop what the mask kept: stays masked
            counts[group.name], share[group.name] = group.channels, group.alive / group.channels
        if (counts, insensitive) == before:
            break
    return counts, insensitive


def _reason(group: _Group, kept: int, held: float, state: tuple[bool, bool], threshold: float, coverage: float) -> str:
    sparse, insensitive = state
    if not sparse:
        return f"a writer keeps at least {threshold:g} of its weights: unstructured, masked"
    below = f"density {group.density:.3f} < {threshold:g} in every writer"
    if not insensitive:
        return (
            f"{below}, but the channels its budget buys would hold less than {coverage:g} of its "
            "surviving weights: unstructured, masked"
        )
    if kept < group.channels:
        return f"{below}: keeps {kept} of {group.channels} channels, holding {held:.2f} of its surviving weights"
    return f"{below}, but its budget over the inputs it keeps supports all {group.channels} channels: dense, unmasked"


def decide(
    model: nn.Module,
    masks: Masks,
    scores: scorers.Scores,
    analysis: channels.Analysis,
    threshold: float,
    coverage: float = MIN_COVERAGE,
) -> tuple[list[GroupDecision], dict[str, torch.Tensor]]:
    """Per group: insensitive or not, how many channels it keeps, and which (root channel indices).

    A group is insensitive when every writer keeps less than `threshold` of its weights and the channels
    it would keep hold at least `coverage` of its surviving weights: shrinking it then keeps what the
    unstructured mask kept there. It keeps as many channels as its writers' budget supports given the
    inputs they keep, never more than have a surviving weight, chosen by surviving score mass."""
    groups = _groups(model, masks, scores, analysis)
    source = {reader: g.name for g in groups for reader in g.members.readers}  # layer -> the group it reads
    sparse = {g.name for g in groups if _insensitive([mask for *_, mask in g.writers], threshold)}
    counts, insensitive = _settle(groups, sparse, source, coverage)
    decisions, keep = [], {}
    for group in groups:
        kept = counts[group.name]
        keep[group.name] = torch.topk(group.mass, kept, sorted=False).indices.sort().values
        total = group.count.sum()
        held = float(group.count[keep[group.name]].sum() / total) if float(total) else 1.0
        state = (group.name in sparse, group.name in insensitive)
        writers = tuple(name for _, name, *_ in group.writers)
        reason = _reason(group, kept, held, state, threshold, coverage)
        decisions.append(
            GroupDecision(group.name, writers, group.density, group.channels, kept, group.name in insensitive, reason)
        )
    return decisions, keep


@torch.no_grad()
def _zero_channels(found: channels.Members, drop: torch.Tensor) -> None:
    for module, rows in (*found.writers, *found.carriers):
        index = rows[drop]
        if getattr(module, "weight", None) is not None:
            module.weight[index] = 0
        if getattr(module, "bias", None) is not None:
            module.bias[index] = 0


def _shrink(
    model: nn.Module, analysis: channels.Analysis, decisions: list[GroupDecision], keep: dict[str, torch.Tensor]
) -> tuple[set[str], set[str]]:
    """Zero the dropped channels of every insensitive group in place, for surgery to remove. Returns the
    layers pruned structurally (their writers) and the layers whose shape that changes (writers and
    readers)."""
    names = _layer_names(model)
    structured, reshaped = set(), set()
    for plan, decision in zip(analysis.plans, decisions):
        if not decision.insensitive:
            continue
        found = channels.members(plan, analysis.trace.graph)
        drop = torch.ones(found.channels, dtype=torch.bool)
        drop[keep[plan.name]] = False
        _zero_channels(found, drop)
        structured.update(decision.writers)
        reshaped.update(decision.writers)
        reshaped.update(names[m] for m in found.readers if m in names)
    return structured, reshaped


def structure(
    model: nn.Module,
    masks: Masks,
    scores: scorers.Scores,
    example: torch.Tensor,
    threshold: float,
    seed: int = 0,
    coverage: float = MIN_COVERAGE,
) -> tuple[nn.Module, Masks, list[GroupDecision], tuple[str, ...]]:
    """The composite model: insensitive groups shrunk by surgery and rectified, the rest masked."""
    work = copy.deepcopy(model).eval()
    counterpart = {f"{n}.weight": m for n, m in prunable_layers(work).items()}
    masks = {name: masks[name] for name in counterpart}
    scores = {name: scores[name] for name in counterpart}
    analysis = channels.analyse(channels.trace(work, example, None))
    decisions, keep = decide(work, masks, scores, analysis, threshold, coverage)
    structured_layers, reshaped_by_structure = _shrink(work, analysis, decisions, keep)
    fixed = {name: mask for name, mask in masks.items() if name.removesuffix(".weight") not in structured_layers}
    apply_masks(work, fixed)
    shapes = {name: tuple(m.weight.shape) for name, m in prunable_layers(work).items()}
    compact, _ = surgery.compact(work, example, random_checks=16)
    layers = prunable_layers(compact)
    after = {
        f"{name}.weight": layer.weight.detach().ne(0) for name, layer in layers.items() if f"{name}.weight" in fixed
    }
    # surgery also drops dead channels (no surviving weight) of masked groups; a layer reshaped only by
    # that computes what it did and keeps the weights its mask was chosen for, so it is not rectified
    rectified = tuple(
        name
        for name, layer in layers.items()
        if tuple(layer.weight.shape) != shapes[name] and name in reshaped_by_structure
    )
    with torch.random.fork_rng():  # seeded, without moving the caller's random stream
        torch.manual_seed(seed)
        for name in rectified:
            layers[name].reset_parameters()  # the layer's own initialization, computed on its new fan-in
    apply_masks(compact, after)
    return compact, after, decisions, rectified
