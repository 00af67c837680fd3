"""`prunefleet bench reconvene`: structured pruning at init against its unstructured PaI counterpart.

Per scorer and compression, from the same random initialization: the unstructured PaI model (the
scorer's masks over the dense model, stored dense) and the reconvene model (insensitive groups pruned
structurally and rectified, the rest masked), each trained once with the same recipe on Fashion-MNIST.
Reported: test accuracy of both, params and state bytes, CPU latency at batch 1 and 32 measured
interleaved (as an edge serves it by default, BatchNorm folded and channels-last: `speedup_b32`; and
as loaded, eager: `speedup_b32_as_loaded`),
and the time from random init to a model ready to train (SynFlow's rounds included).

Against the dense model (the dense architecture from each seed, trained once with the same recipe, as
the portfolio build does for reconvene): each point's `acc_dense` and `acc_vs_dense_pp` (reconvene
minus dense, mean over seeds), and the speedups over it timed in the same rounds; the summary's
`speedup_within_0_5pp_vs_dense` and `speedup_within_1pp_vs_dense` are the best batch-32 speedup over the
dense model of a point at most that far below its accuracy.

Then the cost of pruning against training on the larger models the targets name: VGG-16 and ResNet-56
on 3x32x32 inputs, SynFlow at the plan's rounds, against one training epoch of a CIFAR-10-sized training
set. How a point and the cost of pruning are measured is `bench.suites.reconvene_parts`; this module
holds the plans, runs them (each point and seed kept in the work directory), joins the seeds of a
point and sums up.

The full run also sweeps the sensitivity threshold at one scorer and compression, and the coverage
(the share of a group's surviving weights the channels it keeps must hold) at two compressions: the
evidence behind the defaults.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import plots, workdir
from bench.suites.reconvene_parts import measure_point, pruning_cost, trained_dense
from cloud.build.methods import reconvene
from common import datasets

FULL = {
    "model": "vgg11",
    "width": 0.5,
    "subset": 10000,
    "epochs": 2,
    "rounds": 100,
    "iters": 20,
    "points": [
        ["synflow", 8],
        ["synflow", 32],
        ["synflow", 128],
        ["snip", 32],
        ["snip", 128],
        ["grasp", 32],
        ["magnitude", 32],
        ["random", 32],
    ],
    "sweep": {"scorer": "synflow", "compression": 32, "thresholds": [0.02, 0.05, 0.25, 1.0]},
    "coverage_sweep": {"scorer": "synflow", "compressions": [32, 128], "coverages": [0.0, 0.5, 0.8]},
    "seeds": [0, 1, 2, 3, 4],
    "timing": ["vgg16", "resnet56"],
    "forms": ["served", "as_loaded"],
}  # what a point's latency covers: finished points are kept per plan
QUICK = {
    "model": "vgg11",
    "width": 0.25,
    "subset": 5000,
    "epochs": 2,
    "rounds": 100,
    "iters": 8,
    "points": [["synflow", 8], ["synflow", 128], ["snip", 128]],
    "sweep": None,
    "seeds": [0, 1, 2],
    "timing": ["resnet56", "vgg16"],
    "forms": ["served", "as_loaded"],
}


SEED_KEYS = ("seed", "acc_unstructured", "acc_reconvene", "acc_gap_pp", "params_reconvene", "groups_structured")
DENSE_KEYS = ("acc_dense", "acc_vs_dense_pp")  # per seed too, when the point was measured against the dense model


def over_seeds(runs: list[dict]) -> dict:
    """A point over several seeds: the first seed's models (structure, bytes, latency) and the mean
    accuracies and gaps of all (against the dense model too), each seed's listed under `seeds`. Paired
    by seed, the gap leaves out how far the recipe itself moves between seeds
    (`acc_unstructured_range_pp`); `acc_gap_pp_sem` is the mean gap's standard error (the seeds'
    standard deviation over the square root of their count). Seeds whose request was refused are left
    out of the means and counted in `seeds_refused`."""
    first = runs[0]
    refused = sum("refused" in r for r in runs)
    runs = [r for r in runs if "refused" not in r]  # a later seed refused: the mean is over those that ran
    if "refused" in first or len(runs) == 1:
        return {**first, "seeds_refused": refused} if refused and "refused" not in first else first

    def mean(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    unstructured = [100 * r["acc_unstructured"] for r in runs]
    gaps = [r["acc_gap_pp"] for r in runs]
    against_dense = tuple(k for k in DENSE_KEYS if all(k in r for r in runs))
    return {
        **first,
        **{key: mean(key) for key in ("acc_unstructured", "acc_reconvene", "acc_gap_pp", *against_dense)},
        "acc_gap_pp_worst_seed": max(gaps),
        "acc_gap_pp_sem": statistics.stdev(gaps) / math.sqrt(len(gaps)),
        "acc_unstructured_range_pp": max(unstructured) - min(unstructured),
        "seeds": [{k: r[k] for k in (*SEED_KEYS, *against_dense)} for r in runs],
        **({"seeds_refused": refused} if refused else {}),
    }


def first_seed(point: dict) -> dict:
    """The point as its first seed alone trained it (what a single-seed sweep compares with)."""
    if "seeds" not in point:
        return point
    first = point["seeds"][0]
    aggregates = ("seeds", "acc_gap_pp_worst_seed", "acc_gap_pp_sem", "acc_unstructured_range_pp")
    rest = {k: v for k, v in point.items() if k not in aggregates}
    keys = ("acc_unstructured", "acc_reconvene", "acc_gap_pp", *DENSE_KEYS)
    return {**rest, **{k: first[k] for k in keys if k in first}}


def _sweep(points: list[dict], scorer: str, compression: float, values, default, reconvene_at) -> list[dict]:
    """Reconvene at each value of one setting (`reconvene_at(value)`, trained without a counterpart),
    its gap taken against the counterpart of the point at the default, which stands for that value."""
    baseline = next(
        (p for p in points if p["scorer"] == scorer and p["compression"] == compression and "refused" not in p), None
    )
    out = []
    for value in values:
        if baseline is not None and value == default:  # the point itself, already trained
            out.append(baseline)
            continue
        point = reconvene_at(value)
        if baseline is not None and "refused" not in point:
            point["acc_gap_pp"] = 100 * (baseline["acc_unstructured"] - point["acc_reconvene"])
        out.append(point)
    return out


def _dense(plan: dict, data: datasets.Dataset, work: Path, seed: int | None = None) -> Callable:
    """The seed's dense model trained once (the plan's first seed by default) and its accuracy, asked
    for only when a point is measured."""
    return partial(trained_dense, plan, data, plan["seeds"][0] if seed is None else seed, work)


def _seeded_point(plan: dict, data: datasets.Dataset, work: Path, scorer: str, c: float, threshold: float) -> dict:
    """One point over the plan's seeds, each seed kept in the work directory on its own; the seeds stop at
    the first one refused."""
    runs = []
    for seed in plan["seeds"]:
        runs.append(
            workdir.cached(
                work,
                f"point-{scorer}-{c:g}-seed{seed}",
                lambda seed=seed: measure_point(
                    plan, data, scorer, float(c), threshold, seed=seed, dense=_dense(plan, data, work, seed)
                ),
            )
        )
        if "refused" in runs[-1]:
            break
    return over_seeds(runs)


def _threshold_sweep(plan: dict, data: datasets.Dataset, work: Path, single: list[dict], threshold: float) -> list:
    """Reconvene at each sensitivity threshold of the plan's sweep (none in the quick plan)."""
    spec = plan["sweep"]
    if not spec:
        return []
    return _sweep(
        single,
        spec["scorer"],
        spec["compression"],
        spec["thresholds"],
        threshold,
        lambda v: workdir.cached(
            work,
            f"sweep-{v:g}",
            lambda: measure_point(
                plan,
                data,
                spec["scorer"],
                float(spec["compression"]),
                v,
                with_baseline=False,
                dense=_dense(plan, data, work),
            ),
        ),
    )


def _coverage_sweep(plan: dict, data: datasets.Dataset, work: Path, single: list[dict], threshold: float) -> list:
    """Reconvene at each coverage of the plan's coverage sweep, per compression (none in the quick plan)."""
    spec = plan.get("coverage_sweep") or {}
    out = []
    for compression in spec.get("compressions", ()):
        out += _sweep(
            single,
            spec["scorer"],
            compression,
            spec["coverages"],
            reconvene.MIN_COVERAGE,
            lambda v, c=compression: workdir.cached(
                work,
                f"coverage-{c:g}-{v:g}",
                lambda: measure_point(
                    plan,
                    data,
                    spec["scorer"],
                    float(c),
                    threshold,
                    with_baseline=False,
                    coverage=v,
                    dense=_dense(plan, data, work),
                ),
            ),
        )
    return out


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    plan = QUICK if quick else FULL
    work, data = workdir.start(plan, work, "runs/bench-reconvene.work", data_dir)
    threshold = reconvene.DEFAULT_THRESHOLD
    points = [_seeded_point(plan, data, work, scorer, c, threshold) for scorer, c in plan["points"]]
    single = [first_seed(p) for p in points]  # the sweeps train one seed: they compare with its pair
    sweep = _threshold_sweep(plan, data, work, single, threshold)
    coverage_sweep = _coverage_sweep(plan, data, work, single, threshold)
    timing = [
        workdir.cached(work, f"timing-{arch}", lambda a=arch: pruning_cost(a, plan["rounds"]))
        for arch in plan["timing"]
    ]
    return {
        "points": points,
        "sweep": sweep,
        "coverage_sweep": coverage_sweep,
        "timing": timing,
        "plan": dict(plan),
        "threshold": threshold,
        "coverage": reconvene.MIN_COVERAGE,
        "summary": summarize(points, timing),
    }


def summarize(points: list[dict], timing: list[dict], tolerance_pp: float = 0.5) -> dict:
    """Over the points that ran (a refused request, such as a layer collapse, is counted apart)."""
    refused = [p for p in points if "refused" in p]
    points = [p for p in points if "refused" not in p]
    within = [p for p in points if p["acc_gap_pp"] <= tolerance_pp]
    return {
        "max_acc_gap_pp": max(p["acc_gap_pp"] for p in points),
        "best_params_ratio": max(p["params_ratio"] for p in points),
        "best_speedup_b32": max(p["speedup_b32"] for p in points),
        "best_speedup_b32_as_loaded": max(p["speedup_b32_as_loaded"] for p in points),
        "prune_s_max": max(p["prune_s"] for p in points),
        "prune_epoch_ratio": max((t["prune_epoch_ratio"] for t in timing), default=None),
        "points_within_0_5pp": len(within),
        "points": len(points),
        "points_refused": len(refused),
        "seeds": max((len(p.get("seeds", [p])) for p in points), default=0),
        "max_acc_gap_pp_worst_seed": max(p.get("acc_gap_pp_worst_seed", p["acc_gap_pp"]) for p in points),
        "seed_spread_pp": max((p["acc_unstructured_range_pp"] for p in points if "seeds" in p), default=None),
        "best_params_ratio_within_0_5pp": max((p["params_ratio"] for p in within), default=None),
        "best_speedup_b32_within_0_5pp": max((p["speedup_b32"] for p in within), default=None),
        **_against_dense(points),
    }


def _against_dense(points: list[dict]) -> dict:
    """The dense model's accuracy (mean over seeds) and reconvene's best batch-32 speedup over it: at
    any accuracy, and at most 0.5 and 1 accuracy points below it (None where no point qualifies)."""
    measured = [p for p in points if "speedup_b32_vs_dense" in p]

    def best(tolerance_pp: float) -> float | None:
        return max((p["speedup_b32_vs_dense"] for p in measured if p["acc_vs_dense_pp"] >= -tolerance_pp), default=None)

    return {
        "acc_dense": measured[0]["acc_dense"] if measured else None,
        "best_speedup_b32_vs_dense": best(math.inf),
        "speedup_within_0_5pp_vs_dense": best(0.5),
        "speedup_within_1pp_vs_dense": best(1.0),
    }


def figures(result: dict, stem: Path) -> list[Path]:
    """PNGs beside the JSON: accuracy against params and batch-32 latency per scorer with standard errors over
    seeds, and the accuracy gap against compression."""
    return plots.reconvene_figures(result, stem)
