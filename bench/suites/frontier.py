"""`prunefleet bench frontier`: every pruning method against the two things a user would try instead.

Per model (VGG-11 at width 0.5 and ResNet-56 at width 1.0, on Fashion-MNIST), from one trained
dense model: the methods registered in `cloud.build.methods` (`structured`, `shifter`, `reconvene`),
each built through the real build (`cloud.build.portfolio.build` with the method's own settings, as
`prunefleet portfolio build --no-onnx` runs it), and two baselines written here: Torch-Pruning alone
(its group-norm pruner at uniform channel ratios from the same dense model, fine-tuned with the same
recipe, no distillation, no latency model) and a narrower model (the dense architecture at smaller
widths, trained from scratch).

Equal budgets: every portfolio of K variants gets B = D + K*F training epochs over the same training
subset. The methods that start from the dense model (structured, shifter, torch-pruning) are charged
its D epochs and fine-tune each variant for F; the ones that have no dense model (reconvene, the
narrow models) train each variant for B/K = D/K + F epochs. What each one spends is counted, not
assumed (`bench.suites.frontier_train.counted`: optimizer steps over the steps of one epoch), and
reported beside the plan.

Per variant: accuracy on the full test split and its delta in points against the dense model (paired
by seed where there are seeds: the dense model and the baselines train from every seed of the plan,
the methods from the first), served latency at batch 1, 8 and 32 (BatchNorm folded, channels-last, as
an edge serves it) timed interleaved with every other variant of the model and the dense model in one
run, parameters, MACs, and the speedup over the dense model; and the same latencies served by ONNX
Runtime (each model exported as a build exports a variant), with the method's figures again on them
(`_ort` keys: reported beside the targets, which judge torch serving, the edge's default). How the
summary reads them is `bench.suites.frontier_summary`. Every trained model and finished point is
kept in the work directory, so a rerun of the same plan trains nothing again.

A method the plan names that is not registered is an error before any work. A build the method
refuses (a target it cannot reach on this model or CPU) is recorded with the method's message, no
variants, and the targets that needed them marked missed; the other methods carry on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import plots, workdir
from bench.suites import frontier_builds, frontier_summary, frontier_train
from common import datasets, models
from common.errors import PrunefleetError
from common.profiling import MIN_ROUNDS

BASELINES = (frontier_train.TORCH_PRUNING, frontier_train.NARROW)


class PlanError(PrunefleetError, ValueError):
    """A frontier plan that cannot give an equal-budget comparison; the message names the setting."""


@dataclass(frozen=True)
class ModelPlan:
    """One model of the benchmark: a zoo name, its width (the dense model's), and the compressions
    reconvene is asked for (SynFlow collapses a layer of a narrow ResNet-56 beyond about 24x, where a
    VGG-11 goes far further, so each model has its own)."""

    model: str
    width: float
    reconvene_compressions: tuple[float, ...]

    def __post_init__(self) -> None:
        models.resolve(self.model)
        if not self.width > 0:
            raise PlanError(f"{self.model}: width must be positive, got {self.width}")
        if any(not c >= 1 for c in self.reconvene_compressions):
            raise PlanError(f"{self.model}: reconvene_compressions must be >= 1, got {self.reconvene_compressions}")


@dataclass(frozen=True)
class Plan:
    """What the benchmark trains and times. K, the variants per method, is the number of structured
    speedups, and every other list (torch-pruning ratios, narrow width multipliers, each model's
    reconvene compressions) has K entries; shifter runs K pruning levels at `shifter_rate`."""

    models: tuple[ModelPlan, ...]
    subset: int  # training images (the same seeded subset for every method)
    dense_epochs: int  # D
    finetune_epochs: int  # F, per variant of the methods that start from the dense model
    seeds: tuple[int, ...]  # the dense model and the baselines; the methods build from the first
    methods: tuple[str, ...]  # registered pruning methods, built through the real build
    speedups: tuple[float, ...]  # structured's targets
    shifter_rate: float
    prune_ratios: tuple[float, ...]  # torch-pruning's uniform channel ratios
    width_multipliers: tuple[float, ...]  # the narrow models' widths, relative to the dense model's
    batches: tuple[int, ...] = (1, 8, 32)
    iters: tuple[int, ...] = (20, 10, 5)  # timed runs per round, per batch
    rounds: int = 15
    batch_size: int = 128
    extra_settings: dict = field(default_factory=dict)  # method name -> more fields of its settings
    test_subset: int = 0  # test images every accuracy is measured on (0: all), the same for every method

    def __post_init__(self) -> None:
        k = len(self.speedups)
        lists = {"prune_ratios": self.prune_ratios, "width_multipliers": self.width_multipliers}
        lists |= {f"{m.model}.reconvene_compressions": m.reconvene_compressions for m in self.models}
        for name, values in lists.items():
            if len(values) != k:
                raise PlanError(f"{name} has {len(values)} entries; every method makes K = {k} variants (speedups)")
        if not self.models or k == 0 or not self.seeds or not self.methods:
            raise PlanError("models, speedups, seeds and methods must not be empty")
        if self.dense_epochs < 1 or self.dense_epochs % k or self.finetune_epochs < 1:
            raise PlanError(
                f"dense_epochs ({self.dense_epochs}) must be a positive multiple of K = {k} (the from-scratch "
                f"variants train D/K + F epochs each) and finetune_epochs >= 1, got {self.finetune_epochs}"
            )
        if any(not 0 < v < 1 for v in (self.shifter_rate, *self.prune_ratios, *self.width_multipliers)):
            raise PlanError("shifter_rate, prune_ratios and width_multipliers must lie in (0, 1)")
        if 32 not in self.batches or len(self.iters) != len(self.batches) or self.rounds < MIN_ROUNDS:
            raise PlanError(f"batches must hold 32, iters one count per batch, rounds >= {MIN_ROUNDS}")
        if set(self.methods) & set(BASELINES) or len(set(self.methods)) != len(self.methods):
            raise PlanError(f"methods must be distinct and none of the baselines {BASELINES}: {self.methods}")

    @property
    def variants(self) -> int:
        return len(self.speedups)

    @property
    def scratch_epochs(self) -> int:
        """Epochs of each variant of a portfolio that has no dense model: B / K."""
        return self.dense_epochs // self.variants + self.finetune_epochs

    @property
    def budget_epochs(self) -> int:
        return self.dense_epochs + self.variants * self.finetune_epochs

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


METHODS = ("structured", "shifter", "reconvene")
# Sized for under 2 hours on 2 CPU cores: VGG-11 at width 0.5 trains at about 0.9 ms an image on them and
# ResNet-56 at width 1.0 (16 to 64 channels) at about 3.5 ms, and every variant is evaluated on the whole
# test split. ResNet-56 is at width 1.0, not the zoo's 0.25 (4 to 16 channels): so narrow a network
# serves no faster however it is pruned (every group at its smallest: 1.04x at batch 32), which would
# leave every method with nothing to show.
FULL = Plan(
    models=(
        ModelPlan("vgg11", 0.5, (8.0, 16.0, 32.0, 64.0, 128.0)),
        ModelPlan("resnet56", 1.0, (2.0, 4.0, 8.0, 16.0, 24.0)),
    ),
    subset=6000,
    dense_epochs=10,
    finetune_epochs=2,
    seeds=(0, 1, 2),
    methods=METHODS,
    speedups=(1.5, 2.0, 3.0, 5.0, 8.0),
    shifter_rate=0.75,  # 5 levels reach 1024x, where shifter's VGG-11 gets its speedup
    prune_ratios=(0.2, 0.3, 0.42, 0.55, 0.65),  # MACs / (1 - r)^2: about the speedups' 1.5x to 8x
    width_multipliers=(0.8, 0.7, 0.58, 0.45, 0.35),  # the same channel counts, trained from scratch
)
QUICK = Plan(  # a smoke run: too little training for the accuracy targets to mean much
    models=(
        ModelPlan("vgg11", 0.5, (16.0, 128.0)),
        ModelPlan("resnet56", 1.0, (4.0, 16.0)),
    ),
    subset=2000,
    dense_epochs=4,  # 2 epochs leave the dense model near 30%: the step schedule drops the rate after 1
    finetune_epochs=1,
    seeds=(0,),
    methods=METHODS,
    speedups=(2.0, 8.0),
    shifter_rate=0.9,
    prune_ratios=(0.3, 0.65),
    width_multipliers=(0.7, 0.35),
    iters=(10, 5, 3),
    rounds=8,
    # accuracies on 2,000 test images (a seeded subset, the same for every method): evaluating ResNet-56
    # on all 10,000, twice a level, was most of the quick plan's time (about 15 s each)
    test_subset=2000,
)


def run(quick: bool, data_dir: Path | None = None, work: Path | None = None) -> dict:
    """Every model of the plan in turn (each resumable from the work directory), then the summary:
    each target judged on the worst of the models."""
    plan = QUICK if quick else FULL
    frontier_builds.check_methods(plan.methods)  # a method not registered is an error before any work
    work, data = workdir.start(plan.as_json(), work, "runs/bench-frontier.work", data_dir)
    results = {m.model: _model(plan, m, data, work / m.model, data_dir) for m in plan.models}
    return {
        "plan": plan.as_json(),
        "dataset": plots.BENCH_DATASET,
        "budget_rule": frontier_summary.budget_rule(plan.dense_epochs, plan.finetune_epochs, plan.variants),
        "models": results,
        "summary": frontier_summary.summarize(results),
    }


def _model(plan: Plan, model_plan: ModelPlan, data: datasets.Dataset, work: Path, data_dir: Path | None) -> dict:
    """One model: the dense model over seeds, every method's build, both baselines over seeds, all of
    them timed together in one run, and what that makes of each method."""
    work.mkdir(parents=True, exist_ok=True)
    parts = frontier_train.Parts(plan, model_plan.model, model_plan.width, data, work)
    dense = [parts.dense(seed) for seed in plan.seeds]
    weights = parts.dense_weights(plan.seeds[0])
    groups, spent, dropped, refused = {}, {}, {}, {}
    loaders = {"dense": lambda: parts.dense_model(plan.seeds[0])}
    for name in plan.methods:
        build = frontier_builds.Build(plan, model_plan, name, work)
        record = build.run(weights, data_dir)
        groups[name], dropped[name] = frontier_builds.variants(record)
        loaders |= {point["key"]: build.loader(point) for point in groups[name]}
        spent[name] = frontier_summary.spent([record], record["from_dense"], parts.steps_per_epoch)
        refused[name] = record.get("refused")
    for name in BASELINES:
        runs = {value: [parts.baseline(name, value, seed) for seed in plan.seeds] for value in parts.values(name)}
        groups[name] = [frontier_train.over_seeds(name, value, seeds) for value, seeds in runs.items()]
        loaders |= {point["key"]: parts.loader(name, point["value"]) for point in groups[name]}
        first_seed = [seeds[0] for seeds in runs.values()]
        spent[name] = frontier_summary.spent(first_seed, name == frontier_train.TORCH_PRUNING, parts.steps_per_epoch)
    timing = workdir.cached(work, "served-timing", lambda: parts.time_together(loaders))
    result = frontier_summary.model_result(
        model_plan.model, model_plan.width, dense, groups, spent, timing, parts.steps_per_epoch
    )
    for name in plan.methods:
        result["methods"][name]["dropped"] = dropped[name]  # levels that are the dense model as given
        if refused[name]:
            result["methods"][name]["refused"] = refused[name]
    return result


def figures(result: dict, stem: Path) -> list[Path]:
    """One PNG per model beside the JSON: accuracy against served latency at batch 32, every method's
    variants joined in latency order, the dense model a star, standard errors where there are seeds."""
    return plots.frontier_figures(result, stem)
