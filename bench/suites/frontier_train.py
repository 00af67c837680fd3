"""What the frontier suite trains itself: the dense model over seeds and the two baselines, each kept in
the work directory, with the training it cost counted; and every model timed together.

Counting: `counted` registers a hook on every torch optimizer's step (`torch.optim.optimizer.
register_optimizer_step_post_hook`) while a piece of work runs, so what a build spends is read off the
optimizer, whatever the method does inside (distillation, a chain of fine-tunings), not assumed from
its settings. An epoch is `steps_per_epoch` steps (the training subset over the batch size). Steps of
an attempt that was interrupted are kept and added to the attempt that finishes: they were spent.

Baselines, from the same training subset and recipe (SGD, the build's defaults):
- `torch-pruning`: Torch-Pruning's `MetaPruner` with `GroupMagnitudeImportance(p=2)` (group L2 norm)
  at one uniform channel ratio over every layer but the classifier, from the dense model of the same
  seed, then fine-tuned; no distillation, no latency model;
- `narrow`: the dense architecture at the dense width times a multiplier, trained from scratch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
import torch_pruning as tp
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench import workdir
from cloud.build import onnx_export
from cloud.build.timing import OrtServed
from cloud.build.train import TrainConfig, evaluate, load_state, save_state, train
from common import datasets, models
from common.files import atomic_write_bytes, atomic_write_json
from common.inference import for_inference
from common.profiling import count_macs, measure_interleaved
from common.variant_spec import VariantSpec

if TYPE_CHECKING:
    from bench.suites.frontier import Plan

log = logging.getLogger(__name__)
TORCH_PRUNING, NARROW = "torch-pruning", "narrow"
ORT = "onnxruntime:"  # the name under which a model served by ONNX Runtime is timed
FLUSH_STEPS = 20  # steps counted between writes of a build's partial count (a SIGKILL skips `finally`)


def counted(work: Path, key: str, compute: Callable[[], dict]) -> dict:
    """`compute()`'s record with the optimizer `steps` it took and its wall time (`seconds`), kept in
    `work` as a finished point (a rerun reads it back and trains nothing). The count so far is written
    every `FLUSH_STEPS` steps, so an interrupted build resumed later is charged what it trained before."""

    def measured() -> dict:
        partial = work / f"{key}.partial.json"
        before = json.loads(partial.read_text()) if partial.exists() else {"steps": 0, "seconds": 0.0}
        steps, started = [0], time.perf_counter()

        def spent() -> dict:
            return {"steps": before["steps"] + steps[0], "seconds": before["seconds"] + time.perf_counter() - started}

        def step(*_) -> None:
            steps[0] += 1
            if steps[0] % FLUSH_STEPS == 0:  # a killed run loses fewer steps than this from the count
                atomic_write_json(partial, spent())

        handle = register_optimizer_step_post_hook(step)
        try:
            record = compute()
        finally:
            handle.remove()
            atomic_write_json(partial, spent())
        partial.unlink()
        return {**record, **spent()}

    return workdir.cached(work, key, measured)


def over_seeds(method: str, value: float, runs: list[dict]) -> dict:
    """One baseline variant over its seeds: the mean accuracy, each seed's under `seeds` (paired with
    the dense model of the same seed when deltas are taken), the first seed's size."""
    return {
        "key": f"{method}/{_label(method, value)}",
        "method": method,
        "label": _label(method, value),
        "name": f"{method} {_label(method, value)}",
        "value": value,
        "accuracy": statistics.fmean(r["accuracy"] for r in runs),
        "seeds": [{"seed": r["seed"], "accuracy": r["accuracy"]} for r in runs],
        "params": runs[0]["params"],
        "macs": runs[0]["macs"],
    }


def _label(method: str, value: float) -> str:
    return f"r{value:g}" if method == TORCH_PRUNING else f"{value:g}w"


def prune_uniformly(dense: nn.Module, ratio: float, shape: tuple[int, ...]) -> nn.Module:
    """A copy of `dense` with `ratio` of the channels of every layer group removed by Torch-Pruning's
    group L2-norm pruner (the classifier's outputs kept). Deterministic for given weights, so a rerun
    rebuilds the same shapes to load a fine-tuned state into."""
    model = copy.deepcopy(dense).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(1, *shape),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier],
    )
    pruner.step()
    return model


@dataclass(frozen=True)
class Parts:
    """The bench-side models of one architecture, each trained once into `work`."""

    plan: Plan
    model: str
    width: float
    data: datasets.Dataset
    work: Path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.info.input_shape)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.plan.batch_size)

    def _recipe(self, epochs: int, seed: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.plan.batch_size, progress=False, seed=seed)

    def _fresh(self, width: float, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return models.build(self.model, models.zoo_kwargs(self.shape, self.data.info.num_classes, width))

    def _trained(self, key: str, model: nn.Module, epochs: int, seed: int) -> dict:
        """Train `model` (resumable per epoch), keep its final state, and measure it."""
        log.info("%s %s: training %d epochs", self.model, key, epochs)
        train(
            model, self.data.info, self.data.train, self._recipe(epochs, seed), checkpoint=self.work / f"{key}.train.pt"
        )
        save_state(self.work / f"{key}.final.pt", {"state": model.state_dict()})
        (self.work / f"{key}.train.pt").unlink(missing_ok=True)
        accuracy = evaluate(model, self.data.info, self.data.test)
        log.info("%s %s: accuracy %.2f%%", self.model, key, 100 * accuracy)
        return {
            "seed": seed,
            "accuracy": accuracy,
            "epochs_planned": epochs,
            "params": models.count_params(model),
            "macs": count_macs(model.eval(), self.shape),
        }

    def _final(self, key: str, model: nn.Module) -> nn.Module:
        model.load_state_dict(load_state(self.work / f"{key}.final.pt")["state"])
        return model.eval()

    def dense(self, seed: int) -> dict:
        """The dense model trained from `seed` for D epochs."""
        key = f"dense-seed{seed}"
        return counted(
            self.work, key, lambda: self._trained(key, self._fresh(self.width, seed), self.plan.dense_epochs, seed)
        )

    def dense_model(self, seed: int) -> nn.Module:
        return self._final(f"dense-seed{seed}", self._fresh(self.width, seed))

    def dense_weights(self, seed: int) -> Path:
        """The dense model of `seed` as a safetensors state dict: what the methods that start from
        trained weights are given (`--weights`)."""
        path = self.work / f"dense-seed{seed}.safetensors"
        if not path.exists():
            state = {k: v.contiguous() for k, v in self.dense_model(seed).state_dict().items()}
            atomic_write_bytes(path, safetensors.torch.save(state))
        return path

    def values(self, baseline: str) -> tuple[float, ...]:
        return self.plan.prune_ratios if baseline == TORCH_PRUNING else self.plan.width_multipliers

    def _baseline_model(self, baseline: str, value: float, seed: int) -> nn.Module:
        if baseline == TORCH_PRUNING:
            return prune_uniformly(self.dense_model(seed), value, self.shape)
        return self._fresh(self.width * value, seed)

    def baseline(self, baseline: str, value: float, seed: int) -> dict:
        """One baseline variant from one seed: pruned from that seed's dense model and fine-tuned for F
        epochs (torch-pruning), or trained from scratch for B/K epochs (narrow)."""
        key = f"{baseline}-{value:g}-seed{seed}"
        epochs = self.plan.finetune_epochs if baseline == TORCH_PRUNING else self.plan.scratch_epochs
        return counted(
            self.work, key, lambda: self._trained(key, self._baseline_model(baseline, value, seed), epochs, seed)
        )

    def loader(self, baseline: str, value: float) -> Callable[[], nn.Module]:
        """The first seed's variant, rebuilt from its kept state (for timing)."""
        seed = self.plan.seeds[0]
        key = f"{baseline}-{value:g}-seed{seed}"
        return lambda: self._final(key, self._baseline_model(baseline, value, seed))

    def _onnx_served(self, model: nn.Module, key: str) -> nn.Module:
        """`model` exported as a build exports a variant (opset, dynamic batch, BatchNorm folded) and
        served by ONNX Runtime as an `onnxruntime` edge serves it, on as many threads as torch."""
        info = self.data.info
        kwargs = models.zoo_kwargs(self.shape, info.num_classes, self.width)
        spec = VariantSpec(self.model, kwargs, info.input_shape, info.num_classes, info.mean, info.std, key, 0.0, 0.0)
        onnx_bytes = onnx_export.export(model, spec, hashlib.sha256(key.encode()).hexdigest())
        return OrtServed(onnx_export.session(onnx_bytes, threads=torch.get_num_threads()))

    def time_together(self, loaders: dict[str, Callable[[], nn.Module]]) -> dict[str, dict]:
        """Every model served both ways an edge serves it, timed at each batch of the plan in the same
        interleaved rounds: by torch (BatchNorm folded, channels-last; `b{batch}_ms`, p50 over rounds,
        and the quartiles) and by ONNX Runtime (`ort_b{batch}_ms`, and its quartiles)."""
        served: dict[str, nn.Module] = {}
        for key, load in loaders.items():
            model = load()
            served[key] = for_inference(model, self.shape)
            served[ORT + key] = self._onnx_served(model, key)
        out: dict[str, dict] = {key: {} for key in loaders}
        for batch, iters in zip(self.plan.batches, self.plan.iters):
            log.info("%s: timing %d models at batch %d", self.model, len(served), batch)
            spreads = measure_interleaved(served, self.shape, batch, iters=iters, rounds=self.plan.rounds)
            for name, spread in spreads.items():
                prefix, key = ("ort_", name[len(ORT) :]) if name.startswith(ORT) else ("", name)
                out[key] |= {
                    f"{prefix}b{batch}_ms": spread.p50_ms,
                    f"{prefix}b{batch}_q1_ms": spread.q1_ms,
                    f"{prefix}b{batch}_q3_ms": spread.q3_ms,
                }
        return out
