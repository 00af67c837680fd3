"""The pruning methods of the frontier suite, each built through the real build
(`cloud.build.portfolio.build` with the method's own settings dataclass), as `prunefleet portfolio
build` would run it.

A method that can start from trained weights (its `weights_refusal` is None: shifter, and structured
when it is registered so) is given the suite's dense model (`--weights`) and fine-tunes each variant
for F epochs (`--epochs`, and its `finetune_epochs` where its settings have one); it is charged the
dense model's D epochs. One that cannot (reconvene) trains each variant for B/K epochs, and is given
the suite's dense model as the one to compare with (`--reference-weights`), so nothing trains only
for that. The level a
method yields that is the dense model as given (compression 1, nothing removed) is the dense model,
not a variant: it is left out and listed under `dropped`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.suites.frontier_train import counted
from cloud.build import portfolio
from cloud.build.methods import METHODS
from cloud.build.methods.base import Method
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig
from common import variant
from common.errors import PrunefleetError

if TYPE_CHECKING:
    from bench.suites.frontier import ModelPlan, Plan

log = logging.getLogger(__name__)
FINETUNE_FIELD = "finetune_epochs"  # the settings field of a method that fine-tunes from trained weights
ENTRY_FIELDS = ("variant_id", "name", "level", "accuracy", "params", "macs", "compression", "params_ratio")


class MethodMissingError(PrunefleetError, LookupError):
    """A method the plan benchmarks that `cloud.build.methods.METHODS` does not register."""


class MethodSettingsError(PrunefleetError, ValueError):
    """Settings the plan gives a method that its settings dataclass does not have."""


def check_methods(names: tuple[str, ...]) -> None:
    """Refuse, before any work, a plan naming a method that is not registered: a benchmark that
    dropped one would answer another question than the one it is asked."""
    missing = [name for name in names if name not in METHODS]
    if missing:
        raise MethodMissingError(
            f"the frontier benchmark compares method(s) {', '.join(missing)}, which cloud.build.methods.METHODS "
            f"does not register (registered: {', '.join(METHODS)}); it cannot run without them"
        )


@dataclass(frozen=True)
class Build:
    """One method's portfolio of one model, in its own store under the work directory (the build's
    own checkpoints make it resumable; its record makes a finished one free to read again)."""

    plan: Plan
    model_plan: ModelPlan
    name: str
    work: Path

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    @property
    def from_dense(self) -> bool:
        return self.method.weights_refusal is None

    @property
    def store(self) -> PortfolioStore:
        return PortfolioStore(self.work / f"build-{self.name}")

    def settings(self) -> object:
        """The method's settings dataclass for this plan: its variant targets, the fine-tuning epochs
        where it fine-tunes, and any further fields the plan names for it."""
        plan, wanted = self.plan, dict(self.plan.extra_settings.get(self.name, {}))
        targets = {
            "structured": {"speedups": tuple(plan.speedups)},
            "shifter": {"levels": plan.variants, "rate": plan.shifter_rate},
            "reconvene": {"compressions": tuple(self.model_plan.reconvene_compressions)},
        }
        wanted |= targets.get(self.name, {})
        fields = {f.name for f in dataclasses.fields(self.method.settings)}
        if self.from_dense and FINETUNE_FIELD in fields:
            wanted[FINETUNE_FIELD] = plan.finetune_epochs
        unknown = sorted(set(wanted) - fields)
        if unknown:
            raise MethodSettingsError(
                f"{self.method.settings.__name__} (method {self.name}) has no field {', '.join(unknown)}; "
                f"its fields: {', '.join(sorted(fields))}"
            )
        return self.method.settings(**wanted)

    def config(self, weights: Path, data_dir: Path | None) -> portfolio.BuildConfig:
        """The build as a user would ask for it, on the CPU with this process's threads and the
        suite's training subset and recipe (the first seed's, like the dense model it starts from),
        without ONNX files (`--no-onnx`: packaging, not pruning, and minutes of a ResNet-56 build)."""
        plan = self.plan
        epochs = plan.finetune_epochs if self.from_dense else plan.scratch_epochs
        return portfolio.BuildConfig(
            out=self.store.root,
            method=self.name,
            model=self.model_plan.model,
            width=self.model_plan.width,
            weights=weights if self.from_dense else None,
            reference_weights=None if self.from_dense else weights,  # compared with the suite's dense model
            data_dir=data_dir,
            subset=plan.subset,
            test_subset=plan.test_subset,
            threads=torch.get_num_threads(),
            device="cpu",
            onnx=False,  # the suite times each variant as torch serves it; ONNX files change no variant
            seed=plan.seeds[0],
            train=TrainConfig(epochs=epochs, batch_size=plan.batch_size, progress=False, seed=plan.seeds[0]),
            method_settings=self.settings(),
        )

    def run(self, weights: Path, data_dir: Path | None) -> dict:
        """The build's manifest entries, whether it started from the dense model, the epochs of a dense
        model the build trained only to compare its variants with (not the method's), and what it spent.
        A build the method refuses (a request it cannot meet on this model or CPU) is recorded as
        `refused`, with no variants, and the benchmark goes on."""
        config = self.config(weights, data_dir)  # the plan's settings: an error here is the plan's, raised

        def compute() -> dict:
            log.info("%s: building %s", self.model_plan.model, self.name)
            record = {"method": self.name, "model": self.model_plan.model, "from_dense": self.from_dense}
            record |= {"entries": [], "reference_epochs": 0}
            try:
                manifest = portfolio.build(config)
            except PrunefleetError as err:
                if not isinstance(err, ValueError):  # a failed step, not a refused request
                    raise
                log.warning("%s: %s refused: %s", self.model_plan.model, self.name, err)
                return {**record, "refused": str(err)}
            reference = getattr(manifest, "dense", None)
            if reference is not None and reference.trained_by_build:
                record["reference_epochs"] = reference.epochs
            return {**record, "entries": [{k: getattr(e, k) for k in ENTRY_FIELDS} for e in manifest.variants]}

        return counted(self.work, f"build-{self.name}", compute)

    def loader(self, point: dict) -> Callable[[], nn.Module]:
        """The variant's model, rebuilt from its file in the store (for timing)."""
        return lambda: variant.load(self.store.variant_path(point["variant_id"])).model


def is_dense(entry: dict) -> bool:
    """A level that is the dense model as given: nothing pruned, nothing removed."""
    return entry["compression"] == 1.0 and entry["params_ratio"] == 1.0


def variants(record: dict) -> tuple[list[dict], list[str]]:
    """A build's variants as points, labelled by their name less the model's (`2x`, `L3`, `synflow-8x`)
    and keyed `method/L<level>` (unique in a build), and the names of the levels left out because they
    are the dense model the method was given."""
    method, points, dropped = record["method"], [], []
    for entry in record["entries"]:
        if record["from_dense"] and is_dense(entry):
            dropped.append(entry["name"])
            continue
        label = entry["name"].removeprefix(f"{record['model']}-")
        points.append({"key": f"{method}/L{entry['level']}", "method": method, "label": label, **entry})
    return points, dropped
