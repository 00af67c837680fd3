"""`prunefleet bench shifter`: a whole shifter build, sparse vs compact per level, and its cost.

IMP with rewinding runs on Fashion-MNIST (resumable: its checkpoints live beside the JSON). Per level:
compression (conv and linear weights / remaining), sparse and compact test accuracy, params as stored
dense vs compact, MACs, CPU latency of the masked sparse model and of the compact one at batch 1 and
32, measured interleaved in the same run, each as an edge serves it by default (`speedup_b32`:
BatchNorm folded, channels-last) and as loaded (`speedup_b32_as_loaded`: eager PyTorch, how an edge
serves with `--no-optimize-models`). Against the dense model (level 0, what the user owns), timed in
the same rounds as each level's pair: `acc_vs_dense_pp` (compact minus dense, in accuracy points),
`speedup_b1_vs_dense`, `speedup_b32_vs_dense` (served), `speedup_b32_as_loaded_vs_dense` and
`macs_ratio_vs_dense`; the summary's `speedup_within_0_5pp_vs_dense` and `speedup_within_1pp_vs_dense`
are the best batch-32 speedup of a level at most that far below the dense accuracy. Then the cost of
the portfolio: `derive_s` is the wall time to turn the IMP checkpoints into compact, checked variants
(load, surgery, check); `train_from_scratch_s` is the wall time to train each compact architecture
from a fresh initialization with the same recipe (what a portfolio of separately designed small
models would cost), with the accuracy each one reaches.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn

from bench import latency, plots, workdir
from cloud.build.compaction import surgery
from cloud.build.methods import masks as masking
from cloud.build.methods import shifter
from cloud.build.train import TrainConfig, evaluate, train
from common import datasets, models
from common.profiling import count_macs

log = logging.getLogger(__name__)
# 10 levels at 50% reach 1024x (20% per level would need 31). Width 0.5: at width 0.25 a batch of 32 is
# so cheap that fixed per-call costs, not the channel count, set its latency, so pruning could not show in it.
FULL = {
    "model": "vgg11",
    "width": 0.5,
    "subset": 12000,
    "epochs": 4,
    "levels": 10,
    "rate": 0.5,
    "rewind_iteration": 20,
    "iters": 20,
}
QUICK = {
    "model": "vgg11",
    "width": 0.25,
    "subset": 1500,
    "epochs": 2,
    "levels": 5,
    "rate": 0.65,
    "rewind_iteration": 10,
    "iters": 8,
}


def _reinitialized(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    """IMP once, then per level its compact variant beside its sparse model, then each compact architecture
    trained from scratch: what deriving the portfolio costs against designing and training each variant."""
    plan = QUICK if quick else FULL
    work, data = workdir.start(plan, work, "runs/bench-shifter.work", data_dir)
    recipe = TrainConfig(epochs=plan["epochs"], batch_size=128, progress=False)
    kwargs = models.zoo_kwargs(data.info.input_shape, data.info.num_classes, plan["width"])
    started = time.perf_counter()
    checkpoints = _imp(plan, kwargs, data, recipe, work)
    imp_s = time.perf_counter() - started
    check = datasets.normalize(data.test.images[:16], data.info.mean, data.info.std)
    dense = models.build(plan["model"], kwargs)
    dense.load_state_dict(checkpoints[0].state)  # level 0: the trained dense model
    points, compacts, derive_s = [], [], 0.0
    for level in checkpoints:
        point, compact, seconds = _level(plan, kwargs, level, data, check, dense.eval())
        points.append(point)
        compacts.append(compact)
        derive_s += seconds
    points = [_against_dense(p, points[0]["sparse_accuracy"]) for p in points]  # level 0's sparse model is dense
    _add_from_scratch(points, compacts, work, data, recipe)
    scratch_s = sum(p["scratch_s"] for p in points)
    return {"points": points, "plan": dict(plan), "imp_s": imp_s, "summary": summarize(points, derive_s, scratch_s)}


def _imp(plan: dict, kwargs: dict, data: datasets.Dataset, recipe: TrainConfig, work: Path) -> list:
    """Every level's checkpoint of IMP with rewinding, from a seeded dense model (resumable from `work`)."""
    config = shifter.ShifterConfig(levels=plan["levels"], rate=plan["rate"], rewind_iteration=plan["rewind_iteration"])
    torch.manual_seed(0)
    return list(shifter.run_imp(models.build(plan["model"], kwargs), data, recipe, config, work))


def _level(
    plan: dict, kwargs: dict, level, data: datasets.Dataset, check: torch.Tensor, dense: nn.Module
) -> tuple[dict, nn.Module, float]:
    """One level: its sparse model made compact by surgery (timed, the cost of deriving the variant), then
    both side by side: accuracy, size, MACs and latency, the dense model timed in the same rounds.
    Returns the point, the compact model and that time."""
    shape = data.info.input_shape
    start = time.perf_counter()
    sparse = models.build(plan["model"], kwargs)
    sparse.load_state_dict(level.state)
    compact, report = surgery.compact(sparse.eval(), check[:1], check_inputs=check)
    derive_s = time.perf_counter() - start
    sparse_acc, compact_acc = evaluate(sparse, data.info, data.test), evaluate(compact, data.info, data.test)
    sparsity = masking.sparsity(level.masks)
    point = {
        "level": level.level,
        "compression": 1.0 / max(1e-12, 1.0 - sparsity),
        "sparsity": sparsity,
        "sparse_accuracy": sparse_acc,
        "compact_accuracy": compact_acc,
        "acc_delta_pp": 100 * (compact_acc - sparse_acc),
        "max_abs_diff": report.max_abs_diff,
        "params_sparse": models.count_params(sparse),
        "params_compact": report.params_after,
        "macs_sparse": count_macs(sparse, shape),
        "macs_compact": count_macs(compact, shape),
        "macs_dense": count_macs(dense, shape),
        "surgery_ms": 1e3 * report.seconds,
        **latency.paired({"dense": dense, "sparse": sparse, "compact": compact}, shape, plan["iters"]),
    }
    point["params_ratio"] = point["params_sparse"] / point["params_compact"]
    point["speedup_b1"] = point["sparse_b1_ms"] / point["compact_b1_ms"]
    point["speedup_b32"] = point["sparse_b32_ms"] / point["compact_b32_ms"]
    point["speedup_b32_as_loaded"] = point["sparse_as_loaded_b32_ms"] / point["compact_as_loaded_b32_ms"]
    log.info("level %d: %s", level.level, {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()})
    return point, compact, derive_s


def _against_dense(point: dict, dense_accuracy: float) -> dict:
    """The level's compact variant against the dense model: accuracy points gained (negative: lost),
    speedups from the same rounds, and MACs ratio."""
    return {
        **point,
        "dense_accuracy": dense_accuracy,
        "acc_vs_dense_pp": 100 * (point["compact_accuracy"] - dense_accuracy),
        "speedup_b1_vs_dense": point["dense_b1_ms"] / point["compact_b1_ms"],
        "speedup_b32_vs_dense": point["dense_b32_ms"] / point["compact_b32_ms"],
        "speedup_b32_as_loaded_vs_dense": point["dense_as_loaded_b32_ms"] / point["compact_as_loaded_b32_ms"],
        "macs_ratio_vs_dense": point["macs_dense"] / point["macs_compact"],
    }


def _add_from_scratch(
    points: list[dict], compacts: list[nn.Module], work: Path, data: datasets.Dataset, recipe: TrainConfig
) -> None:
    """Each point's `scratch_accuracy` and `scratch_s`: its compact architecture trained from a fresh start."""
    for point, compact in zip(points, compacts):
        scratch = workdir.cached(
            work,
            f"scratch-{point['level']}",
            lambda: _from_scratch(compact, point["level"], data, recipe),  # noqa: B023 - called before the loop moves on
        )
        point["scratch_accuracy"], point["scratch_s"] = scratch["accuracy"], scratch["seconds"]


def _from_scratch(compact: nn.Module, level: int, data: datasets.Dataset, recipe: TrainConfig) -> dict:
    """The compact architecture trained from a fresh start; kept in the work directory so a rerun resumes."""
    start = time.perf_counter()
    fresh = train(
        _reinitialized(copy.deepcopy(compact), seed=level), data.info, data.train, recipe, desc=f"scratch L{level}"
    )
    return {"seconds": time.perf_counter() - start, "accuracy": evaluate(fresh, data.info, data.test)}


def within_vs_dense(points: list[dict], tolerance_pp: float) -> float | None:
    """The best batch-32 speedup over the dense model among points at most `tolerance_pp` accuracy
    points below it (None when none is)."""
    return max((p["speedup_b32_vs_dense"] for p in points if p["acc_vs_dense_pp"] >= -tolerance_pp), default=None)


def summarize(points: list[dict], derive_s: float, scratch_s: float) -> dict:
    """The worst compact-vs-sparse delta, the best ratios, the cost of the portfolio, and (for points
    measured against the dense model) the best speedups over it within 0.5 and 1 accuracy points."""
    dense = [p for p in points if "acc_vs_dense_pp" in p]
    return {
        "max_acc_delta_pp": max(abs(p["acc_delta_pp"]) for p in points),
        "best_params_ratio": max(p["params_ratio"] for p in points),
        "best_speedup_b32": max(p["speedup_b32"] for p in points),
        "best_speedup_b32_as_loaded": max(p["speedup_b32_as_loaded"] for p in points),
        "derive_s": derive_s,
        "train_from_scratch_s": scratch_s,
        "generation_speedup": scratch_s / max(derive_s, 1e-9),
        "levels": len(points),
        "dense_accuracy": dense[0]["dense_accuracy"] if dense else None,
        "best_speedup_b32_vs_dense": max((p["speedup_b32_vs_dense"] for p in dense), default=None),
        "speedup_within_0_5pp_vs_dense": within_vs_dense(dense, 0.5),
        "speedup_within_1pp_vs_dense": within_vs_dense(dense, 1.0),
    }


def figures(result: dict, stem: Path) -> list[Path]:
    """PNGs beside the JSON: accuracy against params and batch-32 latency, sparse vs compact per level, the dense
    model a star."""
    return plots.shifter_figures(result, stem)
