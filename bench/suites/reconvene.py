"""`prunefleet bench reconvene`: structured pruning at init against its unstructured PaI counterpart.

Per scorer and compression, from the same random initialization: the unstructured PaI model (the
scorer's masks over the dense model, stored dense) and the reconvene model (insensitive groups pruned
structurally and rectified, the rest masked), each trained once with the same recipe on Fashion-MNIST.
Reported: test accuracy of both, params and state bytes, CPU latency at batch 1 and 32 measured
interleaved (as an edge serves it by default, BatchNorm folded and channels-last: `speedup_b32`; and
as loaded, eager: `speedup_b32_as_loaded`),
and the time from random init to a model ready to train (SynFlow's rounds included).

Then the cost of pruning against training on the larger models the targets name: VGG-16 and ResNet-56
on 3x32x32 inputs, SynFlow at 100 rounds, against one training epoch of a CIFAR-10-sized training set
(50,000 images; the time of a step does not depend on the pixel values, so an epoch is measured as
`STEP_SAMPLES` steps of random images and labels, scaled to the epoch's step count).

The full run also sweeps the sensitivity threshold at one scorer and compression, and the coverage
(the share of a group's surviving weights the channels it keeps must hold) at two compressions: the
evidence behind the defaults.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bench import latency, plots, workdir
from cloud.build.methods import reconvene, scorers
from cloud.build.train import TrainConfig, evaluate, train
from common import datasets, models

log = logging.getLogger(__name__)
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
EPOCH_IMAGES = 50_000  # CIFAR-10's training set
STEP_SAMPLES = 6  # timed training steps (after one warm-up) that estimate an epoch
SCORE_BATCHES, SCORE_BATCH_SIZE = 4, 64


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _prune(
    plan: dict, data: datasets.Dataset, scorer: str, compression: float, threshold: float, coverage: float, seed: int
) -> tuple[nn.Module, reconvene.Pruned]:
    """The dense model initialized from `seed`, and reconvene's composite model from it."""
    torch.manual_seed(seed)
    dense = models.build(plan["model"], models.zoo_kwargs(data.info.input_shape, data.info.num_classes, plan["width"]))
    example = datasets.normalize(data.train.images[:1], data.info.mean, data.info.std)
    batches = scorers.scoring_batches(scorer, data, SCORE_BATCHES, SCORE_BATCH_SIZE, seed)
    return dense, reconvene.prune(
        dense, scorer, compression, example, batches, threshold, plan["rounds"], coverage=coverage
    )


def _point(
    plan: dict,
    data: datasets.Dataset,
    scorer: str,
    compression: float,
    threshold: float,
    with_baseline: bool = True,
    coverage: float = reconvene.MIN_COVERAGE,
    seed: int | None = None,
) -> dict:
    """One scorer and compression from one seed (initialization, scoring batches and data order; the
    plan's first by default): both models trained, and with the baseline their latencies."""
    shape = data.info.input_shape
    seed = plan["seeds"][0] if seed is None else seed
    recipe = TrainConfig(epochs=plan["epochs"], batch_size=128, progress=False, seed=seed)
    try:
        dense, pruned = _prune(plan, data, scorer, compression, threshold, coverage, seed)
    except reconvene.ReconveneError as err:  # e.g. layer collapse: the unstructured model is as broken
        log.warning("%s %gx refused: %s", scorer, compression, err)
        return {"scorer": scorer, "compression": compression, "threshold": threshold, "refused": str(err)}
    point = {
        "scorer": scorer,
        "compression": compression,
        "threshold": threshold,
        "coverage": coverage,
        "seed": seed,
        "prune_s": pruned.seconds,
        "score_s": pruned.score_s,
        "structure_s": pruned.structure_s,
        "params_dense": models.count_params(dense),
        "params_reconvene": models.count_params(pruned.model),
        "weights_remaining": pruned.remaining_weights,
        "weights_reconvene": pruned.weights,
        "bytes_unstructured": _state_bytes(dense),
        "bytes_reconvene": _state_bytes(pruned.model),
        "groups_structured": sum(d.insensitive for d in pruned.decisions),
        "groups": len(pruned.decisions),
        "decisions": [
            {
                "group": d.group,
                "density": d.density,
                "kept": d.kept,
                "channels": d.channels,
                "insensitive": d.insensitive,
            }
            for d in pruned.decisions
        ],
    }
    started = time.perf_counter()
    trained = train(pruned.model, data.info, data.train, recipe, masks=pruned.masks, desc=f"reconvene {scorer}")
    point["train_reconvene_s"] = time.perf_counter() - started
    point["acc_reconvene"] = evaluate(trained, data.info, data.test)
    point["params_ratio"] = point["params_dense"] / point["params_reconvene"]
    if not with_baseline:
        return point
    unstructured = copy.deepcopy(dense)
    started = time.perf_counter()
    train(unstructured, data.info, data.train, recipe, masks=pruned.unstructured, desc=f"unstructured {scorer}")
    point["train_unstructured_s"] = time.perf_counter() - started
    point["acc_unstructured"] = evaluate(unstructured, data.info, data.test)
    point["acc_gap_pp"] = 100 * (point["acc_unstructured"] - point["acc_reconvene"])
    if seed != plan["seeds"][0]:  # latency is measured on the first seed's models
        return point
    point.update(latency.paired({"unstructured": unstructured, "reconvene": trained}, shape, plan["iters"]))
    point["speedup_b1"] = point["unstructured_b1_ms"] / point["reconvene_b1_ms"]
    point["speedup_b32"] = point["unstructured_b32_ms"] / point["reconvene_b32_ms"]
    point["speedup_b32_as_loaded"] = point["unstructured_as_loaded_b32_ms"] / point["reconvene_as_loaded_b32_ms"]
    log.info(
        "%s %gx: %s",
        scorer,
        compression,
        {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items() if k != "decisions"},
    )
    return point


SEED_KEYS = ("seed", "acc_unstructured", "acc_reconvene", "acc_gap_pp", "params_reconvene", "groups_structured")


def over_seeds(runs: list[dict]) -> dict:
    """A point over several seeds: the first seed's models (structure, bytes, latency) and the mean
    accuracies and gap of all, each seed's listed under `seeds`. Paired by seed, the gap leaves out how
    far the recipe itself moves between seeds (`acc_unstructured_range_pp`); `acc_gap_pp_sem` is the
    mean gap's standard error (the seeds' standard deviation over the square root of their count)."""
    first = runs[0]
    if "refused" in first or len(runs) == 1:
        return first

    def mean(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    unstructured = [100 * r["acc_unstructured"] for r in runs]
    gaps = [r["acc_gap_pp"] for r in runs]
    return {
        **first,
        "acc_unstructured": mean("acc_unstructured"),
        "acc_reconvene": mean("acc_reconvene"),
        "acc_gap_pp": mean("acc_gap_pp"),
        "acc_gap_pp_worst_seed": max(gaps),
        "acc_gap_pp_sem": statistics.stdev(gaps) / math.sqrt(len(gaps)),
        "acc_unstructured_range_pp": max(unstructured) - min(unstructured),
        "seeds": [{k: r[k] for k in SEED_KEYS} for r in runs],
    }


def first_seed(point: dict) -> dict:
    """The point as its first seed alone trained it (what a single-seed sweep compares with)."""
    if "seeds" not in point:
        return point
    first = point["seeds"][0]
    aggregates = ("seeds", "acc_gap_pp_worst_seed", "acc_gap_pp_sem", "acc_unstructured_range_pp")
    rest = {k: v for k, v in point.items() if k not in aggregates}
    return {**rest, **{k: first[k] for k in ("acc_unstructured", "acc_reconvene", "acc_gap_pp")}}


def _epoch_s(model: nn.Module, shape: tuple, batch_size: int = 128) -> float:
    """One training epoch over EPOCH_IMAGES images, from the mean of STEP_SAMPLES timed SGD steps."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, *shape, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    steps = []
    for step in range(STEP_SAMPLES + 1):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up allocators and kernels
            steps.append(time.perf_counter() - started)
    return sum(steps) / len(steps) * math.ceil(EPOCH_IMAGES / batch_size)


def _timing(arch: str, rounds: int) -> dict:
    shape = (3, 32, 32)
    torch.manual_seed(0)
    dense = models.build(arch, {"in_channels": 3, "num_classes": 10, "input_size": 32, "width": 1.0})
    pruned = reconvene.prune(dense, "synflow", 32.0, torch.randn(1, *shape), rounds=rounds)
    epoch = _epoch_s(copy.deepcopy(dense), shape)
    result = {
        "model": arch,
        "input_shape": list(shape),
        "scorer": "synflow",
        "rounds": rounds,
        "compression": 32.0,
        "prune_s": pruned.seconds,
        "score_s": pruned.score_s,
        "structure_s": pruned.structure_s,
        "epoch_s": epoch,
        "prune_epoch_ratio": pruned.seconds / epoch,
        "params_ratio": models.count_params(dense) / models.count_params(pruned.model),
    }
    log.info("timing %s: %s", arch, result)
    return result


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


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    plan = QUICK if quick else FULL
    work, data = workdir.start(plan, work, "runs/bench-reconvene.work", data_dir)
    threshold = reconvene.DEFAULT_THRESHOLD
    points = []
    for scorer, c in plan["points"]:
        runs = []
        for seed in plan["seeds"]:
            runs.append(
                workdir.cached(
                    work,
                    f"point-{scorer}-{c:g}-seed{seed}",
                    lambda s=scorer, c=c, seed=seed: _point(plan, data, s, float(c), threshold, seed=seed),
                )
            )
            if "refused" in runs[-1]:
                break
        points.append(over_seeds(runs))
    single = [first_seed(p) for p in points]  # the sweeps train one seed: they compare with its pair
    sweep = []
    if plan["sweep"]:
        spec = plan["sweep"]
        sweep = _sweep(
            single,
            spec["scorer"],
            spec["compression"],
            spec["thresholds"],
            threshold,
            lambda v: workdir.cached(
                work,
                f"sweep-{v:g}",
                lambda: _point(plan, data, spec["scorer"], float(spec["compression"]), v, with_baseline=False),
            ),
        )
    coverage_sweep = []
    for compression in (plan.get("coverage_sweep") or {}).get("compressions", ()):
        spec = plan["coverage_sweep"]
        coverage_sweep += _sweep(
            single,
            spec["scorer"],
            compression,
            spec["coverages"],
            reconvene.MIN_COVERAGE,
            lambda v, c=compression: workdir.cached(
                work,
                f"coverage-{c:g}-{v:g}",
                lambda: _point(plan, data, spec["scorer"], float(c), threshold, with_baseline=False, coverage=v),  # noqa: B023 - called before the loop moves on
            ),
        )
    timing = [
        workdir.cached(work, f"timing-{arch}", lambda a=arch: _timing(a, plan["rounds"])) for arch in plan["timing"]
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
    }


def figures(result: dict, stem: Path) -> list[Path]:
    return plots.reconvene_figures(result["points"], stem)
