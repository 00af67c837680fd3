"""`structured`: a chain of channel-pruned variants, each reaching a served speedup, distilled from the dense model.

Level 0 is the dense model (trained with the build's recipe, or the user's `--weights`). Each further
level is the first model of a chain, each pruned from the one before and fine-tuned, whose served
speedup over the dense model reaches the level's target (`--speedups`). A step removes whole channel
groups with torch-pruning's dependency graph (`importance`: which channels; `allocation`: how many in
each group, greedily by importance lost per millisecond saved, from a latency table of every layer
timed alone on this CPU, `latency_table`), measures the pruned model served as an edge serves it
(BatchNorm folded, channels-last, batch `--latency-batch`) against the dense model, and prunes more
until the measurement, not the table, says the step's goal is reached (`chain`). It then fine-tunes
with knowledge distillation from the dense model (`--distill-alpha`, `--distill-temperature`). A
variant that loses more than `--max-drop` points of validation accuracy ends the chain (`chain.collapsed`).

Budget: a level's fine-tuning epochs (`--variant-epochs`, default `--epochs`) are split over its steps
(targets further than `--step-speedup` from the previous one take several), so the whole chain trains
the dense epochs plus `--variant-epochs` per variant, what `shifter` spends for as many levels.

The defaults were chosen by experiment: vgg11 at width 0.5, 12000 Fashion-MNIST images, 4 epochs
dense (88.70% test accuracy); one step pruned to a latency-table speedup of 3.3x, then 1 epoch of
distillation, test accuracy (mean of data orders 0 and 1 where two are given). Balance `log` (the log of
what a group keeps, weighted by its layers' time): taylor 86.97% (87.13, 86.81), l2 86.87% (87.24,
86.49), bn 86.63%; the same widths for every group (a width multiplier, for comparison) 86.95% (87.45,
86.44). The importance removed instead (HALP's knapsack), each group's scores divided by their sum /
mean / as they are: taylor 86.81 / 85.65 / 83.40%, l2 81.45 / 81.71%, bn 80.04 / 82.40%; those summed
objectives shrink some groups to a few channels, the weighted log keeps widths in proportion unless
importance or time say otherwise. Fine-tuning at learning rate 0.01 rather than 0.05: taylor with
sums 86.81% against 81.57%. Channel counts are multiples of 16 (then halvings, down to
`--min-channels`; a group of at most 32 channels steps by 4): on this AVX-512 CPU a conv with 17 to 32
output channels takes about the time of 32 (3x3, 32 input channels at 14x14, batch 32: 16 channels
0.17 ms, 20 channels 0.33 ms, 32 channels 0.29 ms); the latency table holds the finer counts of small
groups at no more than the time of the count above, so a count that saves nothing is passed over.

`--uniform-floor` (each group keeps at least that share of its channels in a uniform width multiplier
as fast as the step's goal), chosen on the frontier benchmark's full plan for VGG-11 (its dense model
of seed 0, 88.68%; 6000 images, 2 epochs a variant, targets 1.5 to 8x), test accuracy delta in points
of the 3x and 5x variants, two builds each (the latency table and the measurements are timed anew in
every build, so builds of the same settings differ): 0 (no floor) -2.98 and -1.46 at 3x, -2.91 and
-6.15 at 5x; 0.75 -2.08 and -0.14, -3.14 and -4.51. Before a group could skip the flat rungs of its
layers' times (`allocation`), the same plan's builds with no floor cut the first four convolutions to
8 to 16 channels and kept the late ones nearly whole (3x variant: -7.58); with the floor at 0.75,
-1.52, -3.62 and -1.59.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cloud.build import distributed
from cloud.build.methods import allocation, chain, latency_table, served, topology
from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.methods.importance import IMPORTANCES, NORMALIZATIONS
from cloud.build.settings import SettingsError
from cloud.build.train import train
from common.files import atomic_write_json
from common.models import prunable_layers

log = logging.getLogger(__name__)
NORMS = tuple(sorted(NORMALIZATIONS))
BALANCES = ("log", *NORMS)  # how removals are priced across groups (see `allocation.allocate`)


@dataclass(frozen=True)
class StructuredConfig:
    """The settings of `structured`; each field is a `portfolio build` flag."""

    speedups: tuple[float, ...] = field(
        default=(1.5, 2.0, 3.0, 4.0, 5.0, 8.0),
        metadata={"help": "served speedups over the dense model, one variant each, increasing"},
    )
    importance: str = field(
        default="taylor", metadata={"help": f"channel importance: {', '.join(sorted(IMPORTANCES))}"}
    )
    balance: str = field(
        default="log",
        metadata={
            "help": "how removals are priced across groups: log (the log of the importance a group keeps, weighted "
            f"by its layers' time) or the importance removed, each group's scores normalized: {', '.join(NORMS)}"
        },
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "weight of the dense model's softened outputs in fine-tuning (0: labels only)"}
    )
    distill_temperature: float = field(default=4.0, metadata={"help": "softmax temperature of distillation"})
    finetune_epochs: int = field(
        default=0,
        metadata={"flag": "--variant-epochs", "help": "fine-tuning epochs per variant, over its steps (0: --epochs)"},
    )
    finetune_lr: float = field(default=0.01, metadata={"help": "learning rate of fine-tuning (0: --lr)"})
    step_speedup: float = field(
        default=1.4, metadata={"help": "largest speedup of one prune step; further targets take several steps"}
    )
    channel_multiple: int = field(default=16, metadata={"help": "channel counts are multiples of this (CPU blocks)"})
    min_channels: int = field(default=4, metadata={"help": "fewest channels a group keeps"})
    uniform_floor: float = field(
        default=0.75,
        metadata={
            "help": "share of its channels in a uniform width multiplier as fast as the step's goal that a group keeps "
            "at least (0: no floor, 1: never narrower than that multiplier)"
        },
    )
    importance_batches: int = field(default=8, metadata={"help": "batches of 64 the taylor importance averages"})
    latency_batch: int = field(default=32, metadata={"help": "batch size speedups are measured at"})
    max_drop: float = field(
        default=0.0,
        metadata={
            "help": "points of validation accuracy a variant may lose against the dense model: one that loses more "
            "ends the chain, and it and the targets after it are left out (0, the default: keep every variant)"
        },
    )

    def __post_init__(self) -> None:
        s = self.speedups
        if not s or any(not v >= 1.0 for v in s) or any(b <= a for a, b in zip(s, s[1:])):
            raise SettingsError(f"speedups must be >= 1 and increasing, got {','.join(map(str, s)) or 'none'}")
        if self.importance not in IMPORTANCES:
            raise SettingsError(f"unknown importance {self.importance!r}; known: {', '.join(sorted(IMPORTANCES))}")
        if self.balance not in BALANCES:
            raise SettingsError(f"unknown balance {self.balance!r}; known: {', '.join(BALANCES)}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise SettingsError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not self.distill_temperature > 0:
            raise SettingsError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.finetune_epochs < 0 or self.finetune_lr < 0:
            raise SettingsError("finetune_epochs (--variant-epochs) and finetune_lr must be >= 0")
        if not self.step_speedup > 1.0:
            raise SettingsError(f"step_speedup must be > 1, got {self.step_speedup}")
        if not 0.0 <= self.uniform_floor <= 1.0:
            raise SettingsError(f"uniform_floor must be in [0, 1], got {self.uniform_floor}")
        if not self.max_drop >= 0:
            raise SettingsError(f"max_drop must be >= 0 points, got {self.max_drop}")
        for name in ("channel_multiple", "min_channels", "importance_batches", "latency_batch"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")


def planned_compressions(settings: StructuredConfig) -> list[float]:
    """What each level is planned to reach: here a served speedup over the dense model (level 0: 1)."""
    return [1.0, *settings.speedups]


def planned_steps(settings: StructuredConfig, level: int, budget: int) -> int:
    """Steps toward level `level`'s target: enough that none speeds up by more than `step_speedup`,
    at most one per fine-tuning epoch."""
    start = settings.speedups[level - 2] if level > 1 else 1.0
    ratio = settings.speedups[level - 1] / start
    wanted = math.ceil(math.log(ratio) / math.log(settings.step_speedup) - 1e-9) if ratio > 1 else 1
    return max(1, min(wanted, budget))


def _weights(model: nn.Module) -> int:
    return sum(layer.weight.numel() for layer in prunable_layers(model).values())


def _table(context: BuildContext, settings: StructuredConfig, dense: nn.Module, ladder) -> tuple:
    """The latency table and the measured speedup of the fastest model the chain can make (every group
    at its smallest), both timed once on the dense shapes and kept in the work directory."""
    work, shape = context.work_dir / "structured", tuple(context.data.info.input_shape)
    path, floor_path = work / "latency.json", work / "floor.json"
    if distributed.is_main() and not floor_path.exists():
        with torch.random.fork_rng(devices=[]):
            example = torch.randn(1, *shape)
            analysis = chain.analysis(dense, example)
            found = topology.build(analysis)
            shapes = latency_table.layer_shapes(dense, example, analysis.trace.names)
            table = latency_table.build(found, shapes, ladder, settings.latency_batch)
            table.save(path)
            floor = dict(allocation.floor_counts(found, ladder))
            fastest = allocation.prune(served.copy_of(dense), example, IMPORTANCES["l2"](analysis), floor)
            predicted = table.predict(found, floor)
            times = (table.predict(found, found.groups), predicted)
            speedup = served.measure(dense, fastest, shape, settings.latency_batch, times)
            atomic_write_json(floor_path, {"speedup": speedup, "predicted_ms": predicted})
    distributed.barrier()
    return latency_table.LatencyTable.load(path), json.loads(floor_path.read_text())["speedup"]


def reachable_targets(settings: StructuredConfig, floor: float, model: str) -> StructuredConfig:
    """The settings with only the targets the fastest model of the chain reaches (`floor`, measured): a
    target beyond it is left out with a warning, since no pruning of this model serves that fast on
    this CPU; none left is an error before any training."""
    kept = tuple(t for t in settings.speedups if served.reaches(floor, t))
    if not kept:
        raise SettingsError(
            f"speedups: {min(settings.speedups):g}x is beyond {model} on this CPU: with every channel group at its "
            f"smallest (--min-channels {settings.min_channels}) it serves {floor:.2f}x faster than the dense model "
            f"at batch {settings.latency_batch}"
        )
    if len(kept) < len(settings.speedups):
        log.warning(
            "structured: leaving out %s: beyond %s on this CPU, whose fastest pruning serves %.2fx faster than the "
            "dense model at batch %d (--min-channels %d)",
            ", ".join(f"{t:g}x" for t in settings.speedups[len(kept) :]),
            model,
            floor,
            settings.latency_batch,
            settings.min_channels,
        )
    return dataclasses.replace(settings, speedups=kept)


def _dense(context: BuildContext, model: nn.Module, trained: bool) -> nn.Module:
    """Level 0: the dense model, trained with the build's recipe unless it is the user's."""
    work = context.work_dir / "structured"
    done = work / "dense.safetensors"
    if done.exists():
        return chain.load_model(context, done)
    if not trained:
        data = context.data
        checkpoint = work / "dense.train.pt"
        train(
            model,
            data.info,
            data.train,
            context.config.train,
            checkpoint=checkpoint,
            desc="structured dense",
            device=context.device,
        )
    if distributed.is_main():
        chain.save_model(context, done, model.cpu().eval())
        (work / "dense.train.pt").unlink(missing_ok=True)
    distributed.barrier()
    return model.cpu().eval()


def _reach(steps: chain.Chain, parent: nn.Module, level: int, records: list, history: list, budget: int) -> nn.Module:
    """The first model of the chain whose measured speedup reaches level `level`'s target, stepping
    from `parent` as needed (each step appended to `records` and `history`)."""
    target = steps.settings.speedups[level - 1]
    planned = planned_steps(steps.settings, level, budget)
    while True:
        last = records[-1] if records else None
        if last is not None and (served.reaches(last.speedup, target) or (last.level == level and last.variant)):
            return parent
        mine = [r for r in records if r.level == level]
        remaining = max(1, planned - len(mine))
        start = last.speedup if last is not None else 1.0
        goal = target if remaining == 1 else start * (target / start) ** (1 / remaining)
        plan = chain.Plan(len(records) + 1, level, target, goal, remaining, budget - sum(r.epochs for r in mine))
        parent, record = steps.step(parent, plan, history)
        records.append(record)
        history.append((record.predicted_ms, 1.0 / record.speedup))


def levels(context: BuildContext, settings: StructuredConfig) -> Iterator[SparseModel]:
    """The dense model, then one chain variant per target speedup, up to one that collapses."""
    (context.work_dir / "structured").mkdir(parents=True, exist_ok=True)
    ladder = functools.partial(
        latency_table.channel_ladder, multiple=settings.channel_multiple, minimum=settings.min_channels
    )
    torch.manual_seed(context.config.seed)
    trained = context.trained_model()
    dense = context.new_model() if trained is None else trained
    table, floor = _table(context, settings, dense, ladder)
    settings = reachable_targets(settings, floor, context.config.model)
    dense = _dense(context, dense, trained is not None)
    steps = chain.Chain(context, settings, dense, table, ladder)
    model, name = dense, context.config.model
    # the build gets copies: whatever it does to them, the chain goes on from its own models
    yield SparseModel(0, served.copy_of(dense), {}, compression=1.0, name=f"{name}-dense", compact=True)
    budget = settings.finetune_epochs or context.config.train.epochs
    records, history, dense_weights = [], [(steps.predicted(dense), 1.0)], _weights(dense)
    dense_accuracy = chain.validation_accuracy(context, dense) if settings.max_drop else None
    for level, target in enumerate(settings.speedups, 1):
        model = _reach(steps, model, level, records, history, budget)
        log.info("structured %gx: step %d measured %.2fx", target, len(records), records[-1].speedup)
        if chain.collapsed(context, settings, dense_accuracy, model, level):
            break
        compression = dense_weights / _weights(model)
        yield SparseModel(
            level, served.copy_of(model), {}, compression=compression, name=f"{name}-{target:g}x", compact=True
        )
    steps.summarize(records, 0 if trained is not None else context.config.train.epochs)


METHOD = Method(
    name="structured",
    help="latency-aware channel pruning to target speedups, each variant distilled from the dense model",
    settings=StructuredConfig,
    levels=levels,
    planned_compressions=planned_compressions,
    weights_refusal=None,
    dense_level=True,
)
