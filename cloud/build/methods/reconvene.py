"""`reconvene`: structured pruning at initialization (after Reconvene, CCGrid 2024).

From a freshly initialized model: score every conv and linear weight with a PaI scorer (`cloud.build.methods.scorers`)
and keep the top 1/compression under one global threshold; then
1. the **sensitivity evaluator** looks at each channel group (the layers that lose a channel together,
   from `cloud.channels`: a conv with its BatchNorm, a residual stage, ...). A group is insensitive to
   structured pruning when every layer writing it keeps less than `threshold` of its weights and the
   channels it would keep (step 2) hold at least `coverage` of its surviving weights: where the mask
   spreads its weights over many channels, a few dense channels would drop most of what it kept;
2. an insensitive group keeps as many channels as its writers' unstructured budget supports (the
   surviving weights divided by what one output channel costs, given the inputs its own input group
   keeps), never more than have a surviving weight, chosen by surviving score mass; the other
   channels' filters and BatchNorm entries are zeroed and the project's surgery removes them, with its
   equivalence check. Surgery also removes the dead channels (no surviving weight) of masked groups;
3. the **layer rectifier** re-initializes every layer whose shape the structured pruning changed (the
   writers and readers of a shrunk group) with its own fan-in-correct initialization
   (`reset_parameters` on the new shape); a layer reshaped only by dead channels keeps its weights;
4. sensitive layers keep their unstructured masks, fixed during training: the result is a composite
   model, dense where it was pruned structurally, masked where it was not, trained once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from cloud.build.compaction import channels, surgery
from cloud.build.methods import scorers
from cloud.build.methods.masks import Masks
from cloud.build.train import apply_masks
from common.errors import PrunefleetError
from common.models import count_params, prunable_layers

DEFAULT_THRESHOLD = 0.05  # chosen by the sweep in `prunefleet bench reconvene`; see docs/results.md
MIN_COVERAGE = 0.8  # share of a group's surviving weights its kept channels must hold; docs/results.md


class ReconveneError(PrunefleetError, ValueError):
    """A request reconvene cannot meet; raised before any training, naming the layer or setting."""


@dataclass(frozen=True)
class ReconveneConfig:
    scorer: str = "synflow"
    compressions: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0)  # total weights / remaining weights
    threshold: float = DEFAULT_THRESHOLD  # a group is insensitive when its writers' density is below this
    coverage: float = MIN_COVERAGE  # ... and the channels it keeps hold at least this share of its weights
    rounds: int = 100  # SynFlow rounds
    score_batches: int = 4  # labelled batches for SNIP and GraSP
    score_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.scorer not in {*scorers.SCORERS, "synflow"}:
            known = ", ".join(sorted({*scorers.SCORERS, "synflow"}))
            raise ReconveneError(f"unknown scorer {self.scorer!r}; known: {known}")
        if not self.compressions or any(not c >= 1.0 for c in self.compressions):
            raise ReconveneError(f"compressions must be >= 1, got {self.compressions}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ReconveneError(f"threshold is a density in [0, 1], got {self.threshold}")
        if not 0.0 <= self.coverage <= 1.0:
            raise ReconveneError(f"coverage is a share in [0, 1], got {self.coverage}")
        if self.rounds < 1 or self.score_batches < 0 or self.score_batch_size < 1:
            raise ReconveneError("rounds and score_batch_size must be positive, score_batches >= 0")


@dataclass(frozen=True)
class GroupDecision:
    group: str  # the group's root layer
    writers: tuple[str, ...]
    density: float  # surviving weights / weights, over the writers
    channels: int
    kept: int  # channels kept (all of them when the group stays unstructured)
    insensitive: bool  # pruned structurally: dense within the channels it keeps
    reason: str


@dataclass(frozen=True)
class Pruned:
    """A composite model ready to train: compact where pruned structurally, masked where not."""

    model: nn.Module
    masks: Masks  # fixed masks of the layers that stay unstructured (names of `model`'s state)
    unstructured: Masks  # the PaI masks over the dense model: the unstructured counterpart
    decisions: tuple[GroupDecision, ...]
    rectified: tuple[str, ...]  # layers re-initialized because their shape changed
    remaining_weights: int  # conv and linear weights left by the PaI mask (the compression's budget)
    weights: int  # conv and linear weights the composite model trains (masked entries excluded)
    score_s: float
    structure_s: float

    @property
    def seconds(self) -> float:
        return self.score_s + self.structure_s


def _layer_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in prunable_layers(model).items()}


def _refuse_collapse(masks: Masks, scorer: str, compression: float) -> None:
    for name, mask in masks.items():
        if not bool(mask.any()):
            advice = "a lower compression" + (" or the iterative scorer synflow" if scorer != "synflow" else "")
            raise ReconveneError(
                f"{scorer} at compression {compression:g} prunes layer {name.removesuffix('.weight')} "
                f"to zero weights (layer collapse): none of its channels would be left. Use {advice}"
            )


def _insensitive(weights: list[torch.Tensor], threshold: float) -> bool:
    return bool(weights) and all(float(mask.float().mean()) < threshold for mask in weights)


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
    names = _layer_names(model)
    graph = analysis.trace.graph
    groups = []
    for plan in analysis.plans:
        found = channels.members(plan, graph)
        writers = [(m, rows, masks[f"{names[m]}.weight"]) for m, rows in found.writers if m in names]
        count = torch.zeros(found.channels, dtype=torch.float64)  # surviving weights per channel
        mass = torch.zeros(found.channels, dtype=torch.float64)
        for module, rows, mask in writers:
            count += mask.flatten(1).sum(1).double()[rows]
            mass += (scores[f"{names[module]}.weight"].double() * mask).flatten(1).sum(1)[rows]
        groups.append((plan, found, writers, count, mass))
    source = {reader: plan.name for plan, found, *_ in groups for reader in found.readers}  # layer -> input group
    sparse = {plan.name for plan, _, writers, *_ in groups if _insensitive([mask for *_, mask in writers], threshold)}
    insensitive = set(sparse)
    # a masked group loses its dead channels (no surviving weight in any writer) to surgery too
    alive = {plan.name: max(1, int((count > 0).sum())) for plan, _, _, count, _ in groups}
    share = {plan.name: alive[plan.name] / found.channels for plan, found, *_ in groups}
    counts = {plan.name: found.channels for plan, found, *_ in groups}
    for _ in range(2 * len(groups) + 2):  # a group's count depends on what its writers' inputs keep
        before = (dict(counts), set(insensitive))
        for plan, found, writers, count, mass in groups:
            if plan.name in insensitive:
                needed = max(
                    math.ceil(
                        int(mask.sum()) / (mask[0].numel() * share[source[m]] if m in source else mask[0].numel())
                    )
                    for m, _, mask in writers
                )
                kept = max(1, min(found.channels, needed, alive[plan.name]))
                top = torch.topk(mass, kept, sorted=False).indices
                if float(count[top].sum()) >= coverage * float(count.sum()):
                    counts[plan.name], share[plan.name] = kept, kept / found.channels
                    continue
                insensitive.discard(plan.name)  # shrinking it would drop what the mask kept: stays masked
            counts[plan.name], share[plan.name] = found.channels, alive[plan.name] / found.channels
        if (counts, insensitive) == before:
            break
    decisions, keep = [], {}
    for plan, found, writers, count, mass in groups:
        density = sum(int(mask.sum()) for *_, mask in writers) / max(1, sum(mask.numel() for *_, mask in writers))
        kept = counts[plan.name]
        top = torch.topk(mass, kept, sorted=False).indices.sort().values
        keep[plan.name] = top
        held = float(count[top].sum() / count.sum()) if float(count.sum()) else 1.0
        if plan.name not in sparse:
            reason = f"a writer keeps at least {threshold:g} of its weights: unstructured, masked"
        elif plan.name not in insensitive:
            reason = (
                f"density {density:.3f} < {threshold:g} in every writer, but the channels its budget buys "
                f"would hold less than {coverage:g} of its surviving weights: unstructured, masked"
            )
        elif kept < found.channels:
            reason = (
                f"density {density:.3f} < {threshold:g} in every writer: keeps {kept} of {found.channels} "
                f"channels, holding {held:.2f} of its surviving weights"
            )
        else:
            reason = (
                f"density {density:.3f} < {threshold:g} in every writer, but its budget over the inputs it "
                f"keeps supports all {found.channels} channels: dense, unmasked"
            )
        decisions.append(
            GroupDecision(
                plan.name,
                tuple(names[m] for m, *_ in writers),
                density,
                found.channels,
                kept,
                plan.name in insensitive,
                reason,
            )
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
    structured_layers, reshaped_by_structure = set(), set()
    names = _layer_names(work)
    for plan, decision in zip(analysis.plans, decisions):
        if not decision.insensitive:
            continue
        found = channels.members(plan, analysis.trace.graph)
        drop = torch.ones(found.channels, dtype=torch.bool)
        drop[keep[plan.name]] = False
        _zero_channels(found, drop)
        structured_layers.update(decision.writers)
        reshaped_by_structure.update(decision.writers)
        reshaped_by_structure.update(names[m] for m in found.readers if m in names)
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


def prune(
    model: nn.Module,
    scorer: str,
    compression: float,
    example: torch.Tensor,
    batches=(),
    threshold: float = DEFAULT_THRESHOLD,
    rounds: int = 100,
    seed: int = 0,
    coverage: float = MIN_COVERAGE,
) -> Pruned:
    """From an initialized dense model to a composite model ready to train; refuses impossible
    requests (see `scorers.check_request`, layer collapse) before any work is spent on them."""
    started = time.perf_counter()
    scores, masks = scorers.score(model, scorer, compression, batches, tuple(example.shape[1:]), rounds, seed)
    scored = time.perf_counter()
    _refuse_collapse(masks, scorer, compression)
    compact, fixed, decisions, rectified = structure(model, masks, scores, example, threshold, seed, coverage)
    done = time.perf_counter()
    weights = sum(
        int(fixed[f"{n}.weight"].sum()) if f"{n}.weight" in fixed else layer.weight.numel()
        for n, layer in prunable_layers(compact).items()
    )
    return Pruned(
        compact,
        fixed,
        masks,
        tuple(decisions),
        rectified,
        sum(int(m.sum()) for m in masks.values()),
        weights,
        scored - started,
        done - scored,
    )


def params_ratio(dense: nn.Module, pruned: nn.Module) -> float:
    """What storing the unstructured PaI model dense costs against the composite model's parameters."""
    return count_params(dense) / count_params(pruned)
