"""Pieces of the reconvene benchmark: one measured point, and the cost of pruning against training.

A point is one scorer and compression from one seed: the dense model initialized from the seed,
reconvene's composite model pruned from it (its structure recorded group by group), trained; and, as
its baseline, the unstructured PaI model (the scorer's masks over the same dense model) trained with
the same recipe, both timed interleaved as an edge serves them and as loaded. Against the dense model
(what the user owns: the dense architecture from the same seed, trained with the same recipe, as the
portfolio build trains it for reconvene), each point has the dense accuracy and `acc_vs_dense_pp`
(reconvene minus dense, in accuracy points), `macs_ratio_vs_dense`, and, where latencies are measured,
the dense model timed in the same rounds (`speedup_b1_vs_dense`, `speedup_b32_vs_dense`,
`speedup_b32_as_loaded_vs_dense`). The dense model trains once per seed, kept in the work directory.

The cost of pruning is measured on the larger models the targets name (3x32x32 inputs, SynFlow): the
time to prune against one training epoch of a CIFAR-10-sized training set (`EPOCH_IMAGES`). The time
of a training step does not depend on the pixel values, so an epoch is estimated from `STEP_SAMPLES`
steps of random images and labels, scaled to the epoch's step count.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench import latency, workdir
from cloud.build.methods import reconvene, scorers
from cloud.build.train import TrainConfig, evaluate, train
from common import datasets, models
from common.profiling import count_macs

log = logging.getLogger(__name__)
EPOCH_IMAGES = 50_000  # CIFAR-10's training set
STEP_SAMPLES = 6  # timed training steps (after one warm-up) that estimate an epoch
SCORE_BATCHES, SCORE_BATCH_SIZE = 4, 64


Dense = Callable[[], tuple[nn.Module, float]]  # the trained dense model of a seed and its test accuracy


def _recipe(plan: dict, seed: int) -> TrainConfig:
    return TrainConfig(epochs=plan["epochs"], batch_size=128, progress=False, seed=seed)


def _dense_model(plan: dict, data: datasets.Dataset, seed: int) -> nn.Module:
    """The dense architecture initialized from `seed` (what reconvene prunes from)."""
    torch.manual_seed(seed)
    return models.build(plan["model"], models.zoo_kwargs(data.info.input_shape, data.info.num_classes, plan["width"]))


def trained_dense(plan: dict, data: datasets.Dataset, seed: int, work: Path) -> tuple[nn.Module, float]:
    """The dense model of `seed` trained with the points' recipe, and its test accuracy; resumable from
    its checkpoint in `work`, the accuracy kept beside it."""
    model = train(
        _dense_model(plan, data, seed),
        data.info,
        data.train,
        _recipe(plan, seed),
        checkpoint=work / f"dense-seed{seed}.pt",
        desc=f"dense seed {seed}",
    )
    measured = workdir.cached(work, f"dense-seed{seed}", lambda: {"accuracy": evaluate(model, data.info, data.test)})
    return model, measured["accuracy"]


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _prune(
    plan: dict, data: datasets.Dataset, scorer: str, compression: float, threshold: float, coverage: float, seed: int
) -> tuple[nn.Module, reconvene.Pruned]:
    """The dense model initialized from `seed`, and reconvene's composite model from it."""
    dense = _dense_model(plan, data, seed)
    example = datasets.normalize(data.train.images[:1], data.info.mean, data.info.std)
    batches = scorers.scoring_batches(scorer, data, SCORE_BATCHES, SCORE_BATCH_SIZE, seed)
    return dense, reconvene.prune(
        dense, scorer, compression, example, batches, threshold, plan["rounds"], coverage=coverage
    )


def _structure(dense: nn.Module, pruned: reconvene.Pruned) -> dict:
    """What pruning took and made: its times, both models' sizes, and each group's decision."""
    return {
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


def _baseline(
    dense: nn.Module, pruned: reconvene.Pruned, data: datasets.Dataset, recipe: TrainConfig, scorer: str
) -> tuple[nn.Module, dict]:
    """The unstructured PaI model (the scorer's masks over a copy of the dense model), trained and tested."""
    unstructured = copy.deepcopy(dense)
    started = time.perf_counter()
    train(unstructured, data.info, data.train, recipe, masks=pruned.unstructured, desc=f"unstructured {scorer}")
    measured = {"train_unstructured_s": time.perf_counter() - started}
    measured["acc_unstructured"] = evaluate(unstructured, data.info, data.test)
    return unstructured, measured


def _against_dense(point: dict, dense: Dense | None, trained: nn.Module, shape: tuple) -> nn.Module | None:
    """Adds reconvene's accuracy against the dense model's (in points) and its MACs ratio to `point`;
    returns the dense model to time beside it (None without one)."""
    if dense is None:
        return None
    model, accuracy = dense()
    point["acc_dense"] = accuracy
    point["acc_vs_dense_pp"] = 100 * (point["acc_reconvene"] - accuracy)
    point["macs_ratio_vs_dense"] = count_macs(model, shape) / count_macs(trained, shape)
    return model


def _latencies(
    unstructured: nn.Module, trained: nn.Module, shape: tuple, iters: int, dense: nn.Module | None = None
) -> dict:
    """Both models (and the dense one, when given) timed interleaved, served and as loaded, and
    reconvene's speedups over the baseline (and over the dense model)."""
    timed = {"unstructured": unstructured, "reconvene": trained}
    baselines = {"": "unstructured"}  # key suffix: the model reconvene's speedup is over
    if dense is not None:
        timed["dense"], baselines["_vs_dense"] = dense, "dense"
    out = latency.paired(timed, shape, iters)
    for suffix, baseline in baselines.items():
        out[f"speedup_b1{suffix}"] = out[f"{baseline}_b1_ms"] / out["reconvene_b1_ms"]
        out[f"speedup_b32{suffix}"] = out[f"{baseline}_b32_ms"] / out["reconvene_b32_ms"]
        out[f"speedup_b32_as_loaded{suffix}"] = out[f"{baseline}_as_loaded_b32_ms"] / out["reconvene_as_loaded_b32_ms"]
    return out


def measure_point(
    plan: dict,
    data: datasets.Dataset,
    scorer: str,
    compression: float,
    threshold: float,
    with_baseline: bool = True,
    coverage: float = reconvene.MIN_COVERAGE,
    seed: int | None = None,
    dense: Dense | None = None,
) -> dict:
    """One scorer and compression from one seed (initialization, scoring batches and data order; the
    plan's first by default): both models trained, and with the baseline their latencies (measured on
    the first seed's models only). With `dense` (the seed's trained dense model, asked for only when
    the point is measured), reconvene against it too, timed in the same rounds."""
    seed = plan["seeds"][0] if seed is None else seed
    recipe = _recipe(plan, seed)
    try:
        initial, pruned = _prune(plan, data, scorer, compression, threshold, coverage, seed)
    except reconvene.ReconveneError as err:  # e.g. layer collapse: the unstructured model is as broken
        log.warning("%s %gx refused: %s", scorer, compression, err)
        return {"scorer": scorer, "compression": compression, "threshold": threshold, "refused": str(err)}
    point = {"scorer": scorer, "compression": compression, "threshold": threshold, "coverage": coverage, "seed": seed}
    point.update(_structure(initial, pruned))
    started = time.perf_counter()
    trained = train(pruned.model, data.info, data.train, recipe, masks=pruned.masks, desc=f"reconvene {scorer}")
    point["train_reconvene_s"] = time.perf_counter() - started
    point["acc_reconvene"] = evaluate(trained, data.info, data.test)
    point["params_ratio"] = point["params_dense"] / point["params_reconvene"]
    dense_model = _against_dense(point, dense, trained, data.info.input_shape)
    if not with_baseline:
        return point
    unstructured, measured = _baseline(initial, pruned, data, recipe, scorer)
    point.update(measured)
    point["acc_gap_pp"] = 100 * (point["acc_unstructured"] - point["acc_reconvene"])
    if seed != plan["seeds"][0]:
        return point
    point.update(_latencies(unstructured, trained, data.info.input_shape, plan["iters"], dense_model))
    log.info(
        "%s %gx: %s",
        scorer,
        compression,
        {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items() if k != "decisions"},
    )
    return point


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


def pruning_cost(arch: str, rounds: int) -> dict:
    """`arch` on 3x32x32 inputs pruned by SynFlow at 32x in `rounds` rounds, against one training epoch."""
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
