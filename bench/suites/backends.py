"""`prunefleet bench backends`: the edge's two backends and two precisions on the same variants.

The portfolios are the demo's (`cloud.localfleet.demo.DemoConfig.build_config`: a `structured`
VGG-11) and the frontier benchmark's VGG-11 (`bench.suites.frontier`'s plan: its width, training subset,
dense and fine-tuning epochs, built with `structured` at the plan's speedups). Each is built once
through the real build with int8 members (`portfolio build --int8`; `portfolio quantize` adds any that
are missing) into the work directory, which a rerun of the same plan resumes from. A build the method
refuses (a speedup beyond what this CPU serves at that width) is recorded with its message and no
variants; the other portfolio carries on, and the summary notes it.

Per float32 variant, three forms, each made ready by the edge's own backends (`edge.backends`): the
variant file served by torch as an edge serves it by default (BatchNorm folded, channels-last), its
ONNX file under ONNX Runtime, and its int8 member under ONNX Runtime. Each form is timed from pixels
in [0, 1] to logits (normalization included, as the edge's `LoadedVariant.forward` runs) at every batch
of the plan, all forms of the portfolio in the same interleaved rounds
(`common.profiling.measure_interleaved`) on the same threads (`prunefleet bench --threads`, 2 by
default). Each form's accuracy is measured on the full test split, next to the manifest's, and the
float32 ONNX file's logits are compared with torch's on every test image.

Then, per portfolio and backend, a real edge agent (`prunefleet-edge run --backend ...`) holds every
member its backend serves, and its VmRSS is read; the installed size of each edge flavour
(`prunefleet[edge]`, `prunefleet[edge-onnx]`) is summed over its dependency closure; the CPU and its
int8 flags are recorded (int8 gains depend on VNNI or AMX). How the parts are measured is
`bench.suites.backends_parts` and `bench.suites.backends_env`.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import workdir
from bench.suites import backends_env, backends_parts, frontier
from cloud.localfleet.demo import DemoConfig
from common import datasets
from common.errors import PrunefleetError
from common.profiling import MIN_ROUNDS

log = logging.getLogger(__name__)
# target key -> (comparison, target), as issue 25 states them
TARGETS = {
    "ort_speedup_b1": (">=", 2.0),
    "ort_speedup_b8": (">=", 1.2),
    "int8_speedup_b8": (">=", 1.5),
    "int8_max_acc_drop_pp": ("<=", 0.5),
    "edge_env_ratio": (">=", 5.0),
}
ELSEWHERE = (
    "switch_p99_us, failed_requests and grpc_overhead_p50_ms on the ORT backend are judged by "
    "`prunefleet bench switching`, effective accuracy with int8 members by `prunefleet bench policy`"
)


class PlanError(PrunefleetError, ValueError):
    """A backends plan that cannot give the figures asked for; the message names the setting."""


@dataclass(frozen=True)
class PortfolioPlan:
    """One portfolio of the benchmark, built with `structured`: its name in the record, the model and
    width, the training subset, the dense model's epochs, each variant's fine-tuning epochs, the
    speedups asked for (one variant each) and the training batch size."""

    name: str
    model: str
    width: float
    subset: int
    epochs: int
    finetune_epochs: int
    speedups: tuple[float, ...]
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.name or self.subset < 0 or self.epochs < 1 or self.finetune_epochs < 0 or not self.speedups:
            raise PlanError(f"portfolio {self.name!r}: a name, subset >= 0, epochs >= 1 and speedups are needed")


@dataclass(frozen=True)
class Plan:
    """The portfolios, the batches timed (1 and 8 at least: the summary's keys), timed runs per round at
    each, and the interleaved rounds."""

    portfolios: tuple[PortfolioPlan, ...]
    batches: tuple[int, ...] = (1, 8, 32)
    iters: tuple[int, ...] = (20, 10, 5)
    rounds: int = 15

    def __post_init__(self) -> None:
        names = [p.name for p in self.portfolios]
        if not names or len(set(names)) != len(names):
            raise PlanError(f"portfolios must be named and distinct, got {names}")
        if not {1, 8} <= set(self.batches) or len(self.iters) != len(self.batches) or min(self.iters) < 1:
            raise PlanError("batches must hold 1 and 8, and iters one count (>= 1) per batch")
        if self.rounds < MIN_ROUNDS:
            raise PlanError(f"rounds must be >= {MIN_ROUNDS}, got {self.rounds}")

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def demo_portfolio(quick: bool) -> PortfolioPlan:
    """The demo's portfolio (`prunefleet demo`, or `--quick`) as this benchmark builds it."""
    config = DemoConfig(out=Path("demo"), quick=quick).build_config()
    settings = config.method_settings
    return PortfolioPlan(
        "demo",
        config.model,
        config.width,
        config.subset,
        config.train.epochs,
        settings.finetune_epochs,
        tuple(settings.speedups),
        config.train.batch_size,
    )


def frontier_portfolio(plan: frontier.Plan) -> PortfolioPlan:
    """The frontier benchmark's VGG-11, built with `structured` at that plan's speedups."""
    model = next(m for m in plan.models if m.model == "vgg11")
    return PortfolioPlan(
        "frontier-vgg11",
        model.model,
        model.width,
        plan.subset,
        plan.dense_epochs,
        plan.finetune_epochs,
        tuple(plan.speedups),
        plan.batch_size,
    )


FULL = Plan(portfolios=(demo_portfolio(False), frontier_portfolio(frontier.FULL)))
QUICK = Plan(  # smaller subsets and fewer variants: the demo's quick portfolio, the frontier's quick plan
    portfolios=(demo_portfolio(True), frontier_portfolio(frontier.QUICK)),
    iters=(10, 5, 3),
    rounds=8,
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _met(value: float | None, comparison: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if comparison == ">=" else value <= target


def summarize(portfolios: dict, env: dict, cpu: dict) -> dict:
    """The summary keys over every variant of every portfolio, the targets and what they rest on."""
    variants = [v for p in portfolios.values() for v in p["variants"]]
    summary = {
        "variants": len(variants),
        "ort_speedup_b1": _median([v["ort_vs_torch"]["b1"] for v in variants]),
        "ort_speedup_b8": _median([v["ort_vs_torch"]["b8"] for v in variants]),
        "int8_speedup_b8": _median([v["int8_vs_fp32"]["b8"] for v in variants if v["int8_vs_fp32"]]),
        "int8_max_acc_drop_pp": max((v["int8_acc_drop_pp"] for v in variants if v["int8"]), default=None),
        "ort_fp32_max_abs_diff": max((v["ort_fp32"]["max_abs_diff"] for v in variants), default=None),
        "ort_fp32_matches_torch": all(v["ort_fp32"]["matches_torch"] for v in variants) if variants else None,
        "ort_fp32_max_acc_diff_pp": max(
            (100 * abs(v["ort_fp32"]["accuracy"] - v["torch"]["accuracy"]) for v in variants), default=None
        ),
        "edge_env_ratio": env["edge_env_ratio"],
        "edge_env_ratio_without_gpu_libraries": env["edge_env_ratio_without_gpu_libraries"],
        "edge_env_mb": {extra: env[extra]["mb"] for extra in backends_env.FLAVOURS.values()},
        "edge_rss_mb": {name: {b: e["vmrss_mb"] for b, e in p["edge_rss"].items()} for name, p in portfolios.items()},
        "cpu_int8": cpu["int8"],
    }
    notes = [ELSEWHERE]
    refused = {name: p["refused"] for name, p in portfolios.items() if p.get("refused")}
    notes += [f"{name}: the build refused: {message}" for name, message in refused.items()]
    summary["targets"] = {}
    for key, (comparison, target) in TARGETS.items():
        met = _met(summary[key], comparison, target)
        if refused and met is None:  # what the target asks for was not delivered
            met = False
        if key == "int8_speedup_b8" and not cpu["int8"]:
            met = None
            notes.append(f"int8_speedup_b8 not judged: {cpu['reason']}")
        summary["targets"][f"{key} {comparison} {target:g}"] = met
    if summary["ort_fp32_matches_torch"] is False:
        notes.append("an ONNX file's logits differ from torch's beyond the export check's tolerance")
    summary["notes"] = notes
    return summary


def run(quick: bool, data_dir: Path | None = None, work: Path | None = None) -> dict:
    """Every portfolio in turn (built, timed and measured once; each step resumable from the work
    directory), the installed sizes, the CPU, and the summary."""
    plan = QUICK if quick else FULL
    work = Path(work or "runs/bench-backends.work")
    workdir.fresh_if_changed(work, plan.as_json())
    test = datasets.load("fashion-mnist", data_dir).test  # every accuracy on the full test split
    threads = torch.get_num_threads()  # `prunefleet bench --threads`: torch's and every ONNX Runtime session's
    portfolios = {}
    for portfolio_plan in plan.portfolios:
        log.info("portfolio %s", portfolio_plan.name)
        store, refused = backends_parts.build_portfolio(portfolio_plan, work, data_dir, threads)
        if refused:
            portfolios[portfolio_plan.name] = {"refused": refused, "variants": [], "edge_rss": {}}
            continue
        measured = backends_parts.measure(store, plan, test, work / portfolio_plan.name, threads)
        measured["edge_rss"] = workdir.cached(
            work / portfolio_plan.name, "edge-rss", lambda s=store: backends_env.edge_rss(s, work, threads)
        )
        portfolios[portfolio_plan.name] = measured
    env, cpu = backends_env.environment_sizes(), backends_env.cpu_int8()
    return {
        "plan": plan.as_json(),
        "threads": threads,
        "cpu": cpu,
        "environments": env,
        "portfolios": portfolios,
        "summary": summarize(portfolios, env, cpu),
    }
