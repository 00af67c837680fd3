"""The `structured` chain's steps: prune the latest model toward a served speedup, then fine-tune it.

A step scores the parent's channels (`importance`), lets the latency table allocate removals toward a
goal of its own prediction (`allocation`), prunes a copy and measures it served as an edge serves it
(`served`: BatchNorm folded, channels-last, batch `latency_batch`) against the dense model served the
same way, in interleaved rounds. Short of the goal, the prediction's goal is corrected from what was
measured (the secant of `allocation.goal_for`) and more is removed; far past it, less (halfway back,
`allocation.next_goal`); up to `MAX_ATTEMPTS` attempts, each allocated afresh from the parent. The
step keeps the least pruned attempt that reached the goal. The measured speedup decides; the table
only proposes.

Every step is checkpointed in `work/structured/`: `step-K.json` (the decision and its measurements),
`step-K.pruned.safetensors` (the pruned model, before fine-tuning), then `step-K.safetensors` (after);
the fine-tuning itself checkpoints every epoch (`step-K.train.pt`). Models are stored as variant files
(`common.variant`), which rebuild any channel-pruned model from its tensors. Under torchrun rank 0
decides and writes; every rank fine-tunes its shard of the same pruned model.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cloud.build import distributed
from cloud.build.compaction import channels
from cloud.build.methods import allocation, importance, served, topology
from cloud.build.methods.base import BuildContext
from cloud.build.methods.latency_table import LatencyTable
from cloud.build.train import Teacher, evaluate, train
from common import variant
from common.batching import batches
from common.files import atomic_write_bytes, atomic_write_json
from common.inference import for_inference

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 8  # prune-and-measure rounds of one step before it settles for what it reached
IMPORTANCE_BATCH = 64


@dataclass(frozen=True)
class Step:
    """One finished decision: which target it serves, what it aimed at and what it measured."""

    step: int
    level: int  # the level (target) it works toward
    goal: float  # the served speedup this step aimed at
    counts: dict[str, int]  # channels per group after pruning
    predicted_ms: float  # the latency table's prediction for the pruned model
    speedup: float  # its measured served speedup (the last attempt's)
    attempts: tuple[tuple[float, float], ...]  # (predicted ms, measured speedup) of every attempt
    epochs: int  # fine-tuning epochs after pruning
    variant: bool  # its model is the variant of `level` (it reached the target, or the last step may)


@dataclass(frozen=True)
class Plan:
    """What the next step is for: its number, the level and target speedup it works toward, the goal
    of this step, the steps planned for the level that are left (this one included) and the level's
    fine-tuning epochs that are left."""

    step: int
    level: int
    target: float
    goal: float
    remaining: int
    epochs: int


class Chain:
    """The chain's shared parts: context, settings, the dense model (served, and as teacher), the table."""

    def __init__(self, context: BuildContext, settings, dense: nn.Module, table: LatencyTable, ladder) -> None:
        self.context, self.settings, self.table, self.ladder = context, settings, table, ladder
        self.work = context.work_dir / "structured"
        self.shape = tuple(context.data.info.input_shape)
        self.example = torch.randn(1, *self.shape, generator=torch.Generator().manual_seed(0))
        self.dense_served = for_inference(served.copy_of(dense), self.shape)
        self.dense_ms = self.predicted(dense)
        self.dense_counts = dict(topology.build(analysis(dense, self.example)).groups)
        self.teacher = Teacher(served.copy_of(dense), settings.distill_alpha, settings.distill_temperature)

    def path(self, step: int, part: str) -> Path:
        return self.work / f"step-{step}{part}"

    def measure(self, model: nn.Module, predicted_ms: float, parent: float) -> float:
        """Served speedup of `model` (predicted at `predicted_ms`) over the dense model (`speedup`). A
        model pruned from one measured at `parent` is at least that fast: a measurement below it is
        taken again, and the faster of the two kept, never below `parent`."""
        model_served, table = for_inference(served.copy_of(model), self.shape), (self.dense_ms, predicted_ms)
        found = served.speedup(self.dense_served, model_served, self.shape, self.settings.latency_batch, table)
        if found < parent:
            again = served.speedup(self.dense_served, model_served, self.shape, self.settings.latency_batch, table)
            log.info(
                "measured %.2fx, below the %.2fx of the model it was pruned from; again: %.2fx", found, parent, again
            )
            found = max(found, again, parent)
        return found

    def predicted(self, model: nn.Module) -> float:
        """The latency table's prediction for `model` as it is."""
        found = topology.build(analysis(model, self.example))
        return self.table.predict(found, found.groups)

    def summarize(self, records: list[Step], dense_epochs: int) -> None:
        """Log and keep (`work/structured/chain.json`) the epochs spent and what each variant reached."""
        tuned = sum(r.epochs for r in records)
        log.info(
            "structured: %d epochs (dense %d, fine-tuning %d over %d steps)",
            dense_epochs + tuned,
            dense_epochs,
            tuned,
            len(records),
        )
        if distributed.is_main():
            variants = [
                {
                    "level": r.level,
                    "step": r.step,
                    "speedup": r.speedup,
                    "table_speedup": self.dense_ms / r.predicted_ms,
                }
                for r in records
                if r.variant or served.reaches(r.speedup, self.settings.speedups[r.level - 1])
            ]
            summary = {
                "dense_epochs": dense_epochs,
                "finetune_epochs": tuned,
                "steps": len(records),
                "variants": variants,
            }
            atomic_write_json(self.work / "chain.json", summary)

    def scores(self, model: nn.Module, step: int) -> tuple[topology.Topology, importance.Scores]:
        """The parent's topology and its channels' importance (a copy is scored: nothing changes it)."""
        work = copy.deepcopy(model)
        traced = analysis(work, self.example)
        data, context = self.context.data, self.context
        seed = context.config.seed * 1000 + step
        found = itertools.islice(
            batches(data.train, data.info, IMPORTANCE_BATCH, shuffle_seed=seed), self.settings.importance_batches
        )
        scores = importance.IMPORTANCES[self.settings.importance](
            traced, model=work, batches=found, device=context.device
        )
        balance = self.settings.balance
        return topology.build(traced), scores if balance == "log" else importance.normalized(scores, balance)

    def decide(self, parent: nn.Module, step: int, goal: float, history: list) -> tuple[nn.Module, dict, list, int]:
        """Prune copies of `parent` until one's measured speedup reaches `goal` without going far past
        it (`allocation.next_goal`), or nothing more is left to remove, or the attempts run out. Each
        attempt allocates from the parent's own counts toward a goal of the table's prediction: the
        first proportional from the parent (`history[-1]`, measured when it was made), the next ones
        from the step's own measurements. Returns the kept model, its counts, every attempt and the
        index of the kept one (`allocation.kept_attempt`)."""
        found, scores = self.scores(parent, step)
        tried, attempts, models = [], [], []
        by_log, share = self.settings.balance == "log", self.settings.uniform_floor
        goal_ms = allocation.goal_for(history[-1:], goal)
        while goal_ms is not None and len(attempts) < MAX_ATTEMPTS:
            floors = allocation.uniform_floors(found, self.table, self.dense_counts, goal_ms, self.ladder, share)
            start = dict(found.groups)
            counts = allocation.allocate(found, self.table, scores, goal_ms, start, self.ladder, by_log, floors)
            if counts in tried:
                break  # nothing new: no more saves time, or the search has closed in on the ladder's steps
            tried.append(counts)
            models.append(allocation.prune(served.copy_of(parent), self.example, scores, counts))
            predicted = self.table.predict(found, counts)
            speedup = self.measure(models[-1], predicted, 1.0 / history[-1][1])
            attempts.append((predicted, speedup))
            log.info(
                "step %d: table %.2fx (%.3f ms), measured %.2fx, goal %.2fx",
                step, self.dense_ms / predicted, predicted, speedup, goal,
            )  # fmt: skip
            goal_ms = allocation.next_goal(history[-1], attempts, goal, served.reaches)
        kept = allocation.kept_attempt(attempts, goal, served.reaches)
        return models[kept], tried[kept], attempts, kept

    def finetune(self, model: nn.Module, step: int, epochs: int) -> nn.Module:
        """Fine-tune a pruned model with distillation from the dense one, resumable by epoch."""
        config = self.context.config.train
        recipe = replace(config, epochs=epochs, lr=self.settings.finetune_lr or config.lr)
        data = self.context.data
        return train(
            model,
            data.info,
            data.train,
            recipe,
            checkpoint=self.path(step, ".train.pt"),
            desc=f"structured step {step}",
            device=self.context.device,
            teacher=self.teacher,
        )

    def step(self, parent: nn.Module, plan: Plan, history: list) -> tuple[nn.Module, Step]:
        """Run (or resume) one step from `parent`: rank 0 decides and stores the pruned model, every
        rank fine-tunes it, rank 0 stores the result."""
        done, pruned_path, record_path = (
            self.path(plan.step, p) for p in (".safetensors", ".pruned.safetensors", ".json")
        )
        if done.exists():
            return load_model(self.context, done), load_step(record_path)
        if distributed.is_main() and not pruned_path.exists():
            model, counts, attempts, kept = self.decide(parent, plan.step, plan.goal, history)
            predicted, speedup = attempts[kept]
            final = served.reaches(speedup, plan.target) or plan.remaining == 1
            epochs = plan.epochs if final else plan.epochs // plan.remaining
            record = Step(plan.step, plan.level, plan.goal, counts, predicted, speedup, tuple(attempts), epochs, final)
            save_model(self.context, pruned_path, model)
            save_step(record_path, record)
        distributed.barrier()
        record = load_step(record_path)
        model = self.finetune(load_model(self.context, pruned_path), plan.step, record.epochs)
        if distributed.is_main():
            save_model(self.context, done, model)
            pruned_path.unlink(missing_ok=True)
            self.path(plan.step, ".train.pt").unlink(missing_ok=True)
        distributed.barrier()
        return model, record


def validation_accuracy(context: BuildContext, model: nn.Module) -> float | None:
    """`model`'s accuracy on the build's validation split (None when it has none)."""
    data = context.data
    return evaluate(model, data.info, data.val, device=context.device) if len(data.val) else None


def collapsed(context: BuildContext, settings, dense_accuracy: float | None, model: nn.Module, level: int) -> bool:
    """Whether level `level`'s model loses more than `max_drop` points of validation accuracy (never
    the test split's) against `dense_accuracy` (None: no validation split); if so, warns naming the targets left out."""
    accuracy = None if dense_accuracy is None else validation_accuracy(context, model)
    if accuracy is None or 100 * (dense_accuracy - accuracy) <= settings.max_drop:
        return False
    log.warning(
        "structured: leaving out %s: the %gx variant scores %.2f%% on the validation split, %.2f points below the "
        "dense model's %.2f%% (--max-drop %g)",
        ", ".join(f"{t:g}x" for t in settings.speedups[level - 1 :]),
        settings.speedups[level - 1],
        100 * accuracy,
        100 * (dense_accuracy - accuracy),
        100 * dense_accuracy,
        settings.max_drop,
    )
    return True


def analysis(model: nn.Module, example: torch.Tensor) -> channels.Analysis:
    """The channel groups of `model` that pruning may shrink (the classifier's outputs never)."""
    return channels.analyse(channels.trace(model, example, None))


def _spec(context: BuildContext) -> variant.VariantSpec:
    config, info = context.config, context.data.info
    return variant.VariantSpec(
        config.model, context.model_kwargs(), info.input_shape, info.num_classes, info.mean, info.std,
        "structured", 0.0, 0.0, classes=info.classes,
    )  # fmt: skip


def save_model(context: BuildContext, path: Path, model: nn.Module) -> None:
    """A chain model as a variant file (its tensors give its pruned shapes), written atomically."""
    atomic_write_bytes(path, variant.encode(model, _spec(context)))


def load_model(context: BuildContext, path: Path) -> nn.Module:
    return variant.load_bytes(path.read_bytes(), allowed_models=(context.config.model,)).model


def save_step(path: Path, record: Step) -> None:
    atomic_write_json(path, {**record.__dict__, "attempts": [list(a) for a in record.attempts]})


def load_step(path: Path) -> Step:
    raw = json.loads(path.read_text())
    return Step(**{**raw, "attempts": tuple(tuple(a) for a in raw["attempts"])})
