"""`reconvene`: structured pruning at initialization (after Reconvene, CCGrid 2024).

From a freshly initialized model: score every conv and linear weight with a PaI scorer
(`cloud.build.methods.scorers`) and keep the top 1/compression under one global threshold; then shrink
the channel groups that mask leaves nearly empty to the channels its budget pays for, re-initialize
the layers whose shape that changed (`cloud.build.methods.sensitivity`: the sensitivity evaluator and
the layer rectifier), and keep the unstructured masks of the other layers, fixed during training. The
result is a composite model, dense where it was pruned structurally, masked where it was not, trained
once. One variant per requested compression; all of them are pruned, and any impossible request
refused, before the first trains.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cloud.build import distributed
from cloud.build.methods import scorers
from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.methods.masks import Masks
from cloud.build.methods.sensitivity import DEFAULT_THRESHOLD, MIN_COVERAGE, GroupDecision, structure
from cloud.build.train import train
from common import datasets
from common.errors import PrunefleetError
from common.files import atomic_write_json
from common.models import count_params, prunable_layers

log = logging.getLogger(__name__)
_SCORERS = frozenset({*scorers.SCORERS, "synflow"})


class ReconveneError(PrunefleetError, ValueError):
    """A request reconvene cannot meet; raised before any training, naming the layer or setting."""


@dataclass(frozen=True)
class ReconveneConfig:
    """The settings of `reconvene`; each field is a `portfolio build` flag."""

    scorer: str = field(default="synflow", metadata={"help": f"pruning-at-init scorer: {', '.join(sorted(_SCORERS))}"})
    compressions: tuple[float, ...] = field(
        default=(2.0, 4.0, 8.0, 16.0, 32.0),
        metadata={"help": "total weights / remaining weights, one variant each"},
    )
    threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={
            "flag": "--sensitivity-threshold",
            "help": "a layer group whose writers all keep less than this share of their weights is pruned structurally",
        },
    )
    coverage: float = field(
        default=MIN_COVERAGE,
        metadata={
            "flag": "--sensitivity-coverage",
            "help": "... and only when the channels it keeps hold at least this share of its surviving weights",
        },
    )
    rounds: int = field(default=100, metadata={"flag": "--synflow-rounds", "help": "rounds of iterative SynFlow"})
    score_batches: int = field(default=4, metadata={"help": "labelled batches that SNIP and GraSP score on"})
    score_batch_size: int = field(default=64, metadata={"help": "images per scoring batch"})

    def __post_init__(self) -> None:
        if self.scorer not in _SCORERS:
            raise ReconveneError(f"unknown scorer {self.scorer!r}; known: {', '.join(sorted(_SCORERS))}")
        if not self.compressions or any(not c >= 1.0 for c in self.compressions):
            raise ReconveneError(f"compressions must be >= 1, got {self.compressions}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ReconveneError(f"threshold is a density in [0, 1], got {self.threshold}")
        if not 0.0 <= self.coverage <= 1.0:
            raise ReconveneError(f"coverage is a share in [0, 1], got {self.coverage}")
        if self.rounds < 1 or self.score_batches < 0 or self.score_batch_size < 1:
            raise ReconveneError("rounds and score_batch_size must be positive, score_batches >= 0")


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


def _refuse_collapse(masks: Masks, scorer: str, compression: float) -> None:
    for name, mask in masks.items():
        if not bool(mask.any()):
            advice = "a lower compression" + (" or the iterative scorer synflow" if scorer != "synflow" else "")
            raise ReconveneError(
                f"{scorer} at compression {compression:g} prunes layer {name.removesuffix('.weight')} "
                f"to zero weights (layer collapse): none of its channels would be left. Use {advice}"
            )


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
    device: torch.device | None = None,
) -> Pruned:
    """From an initialized dense model to a composite model ready to train; refuses impossible
    requests (see `scorers.check_request`, layer collapse) before any work is spent on them. Scoring
    runs on `device` (default: the CPU); the structure is decided on the CPU."""
    started = time.perf_counter()
    shape = tuple(example.shape[1:])
    scores, masks = scorers.score(model, scorer, compression, batches, shape, rounds, seed, device=device)
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


def planned_compressions(settings: ReconveneConfig) -> list[float]:
    """One level per distinct compression, in rising order."""
    return sorted(set(settings.compressions))


def _prepare(context: BuildContext, settings: ReconveneConfig) -> list[Pruned]:
    """Every planned compression pruned from one dense initialization, after every request was checked."""
    seed, data = context.config.seed, context.data
    torch.manual_seed(seed)
    dense = context.new_model()
    example = datasets.normalize(datasets.head(data.train, 1), data.info.mean, data.info.std)
    batches = scorers.scoring_batches(settings.scorer, data, settings.score_batches, settings.score_batch_size, seed)
    for compression in settings.compressions:
        scorers.check_request(dense, settings.scorer, compression, batches)
    return [
        prune(
            dense,
            settings.scorer,
            c,
            example,
            batches,
            settings.threshold,
            settings.rounds,
            seed,
            settings.coverage,
            device=context.device,
        )
        for c in planned_compressions(settings)
    ]


def _write_decisions(path: Path, compressions: list[float], prepared: list[Pruned]) -> None:
    """The per-group decisions of every compression, for the operator."""
    atomic_write_json(
        path,
        [
            {
                "compression": c,
                "ready_s": pruned.seconds,
                "rectified": list(pruned.rectified),
                "groups": [asdict(d) for d in pruned.decisions],
            }
            for c, pruned in zip(compressions, prepared)
        ],
    )


def levels(context: BuildContext, settings: ReconveneConfig) -> Iterator[SparseModel]:
    """One composite model per compression; each trains once, resumably, with the build's recipe."""
    compressions, prepared = planned_compressions(settings), _prepare(context, settings)
    if distributed.is_main():
        _write_decisions(context.work_dir / "reconvene-decisions.json", compressions, prepared)
    for level, (compression, pruned) in enumerate(zip(compressions, prepared)):
        log.info(
            "%s at %gx: %d of %d groups pruned structurally, ready to train in %.2f s",
            settings.scorer,
            compression,
            sum(d.insensitive for d in pruned.decisions),
            len(pruned.decisions),
            pruned.seconds,
        )
        model = train(
            pruned.model,
            context.data.info,
            context.data.train,
            context.config.train,
            masks=pruned.masks,
            checkpoint=context.work_dir / f"reconvene-{level}.pt",
            desc=f"reconvene {level}",
            device=context.device,
        )
        name = f"{context.config.model}-{settings.scorer}-{compression:g}x"
        yield SparseModel(level, model.eval(), pruned.masks, compression=compression, name=name)


METHOD = Method(
    name="reconvene",
    help="structured pruning at initialization, each variant trained once (after Reconvene)",
    settings=ReconveneConfig,
    levels=levels,
    planned_compressions=planned_compressions,
    weights_refusal="reconvene prunes at initialization by definition: it scores, shrinks and trains a freshly "
    "initialized model, so trained weights have no place in it (use --method shifter to prune from them)",
)
