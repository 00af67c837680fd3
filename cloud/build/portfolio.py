"""Build a portfolio: train, prune with a method, compact every sparse model, store the variants."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cloud.build import distributed
from cloud.build.compaction import surgery
from cloud.build.methods import reconvene, scorers, shifter
from cloud.build.methods.masks import sparsity as mask_sparsity
from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from cloud.build.train import TrainConfig, evaluate, train
from common import datasets, models, variant
from common.datasets import Dataset
from common.files import atomic_write_json
from common.inference import for_inference
from common.profiling import count_macs, measure_latency
from common.registry import lookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    method: str = "shifter"
    model: str = "vgg11"
    width: float = 0.25
    dataset: str = "fashion-mnist"
    data_dir: Path | None = None
    subset: int = 0  # training examples to use (0 = all)
    threads: int = 2
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    shifter: shifter.ShifterConfig = field(default_factory=shifter.ShifterConfig)
    reconvene: reconvene.ReconveneConfig = field(default_factory=reconvene.ReconveneConfig)
    check_images: int = 256  # real test images for the surgery equivalence check
    targets: tuple[float, ...] = ()  # keep the levels nearest these compressions (empty: every level)

    def __post_init__(self) -> None:
        lookup(METHODS, "method", self.method)
        models.resolve(self.model, allowed=(self.model,))  # the operator typed it: an import path is allowed
        if self.subset < 0 or self.threads <= 0 or self.check_images <= 0:
            raise ValueError("subset must be >= 0; threads and check_images positive")
        if any(not t >= 1 for t in self.targets):
            raise ValueError(f"target compressions must be >= 1, got {self.targets}")

    def settings(self) -> dict:
        raw = asdict(self)
        raw.pop("out")
        raw["data_dir"] = str(self.data_dir) if self.data_dir else None
        return json.loads(json.dumps(raw, default=str))


@dataclass(frozen=True)
class SparseModel:
    """What a pruning method hands to the portfolio: a trained sparse model and where it came from."""

    level: int
    model: nn.Module
    masks: dict[str, torch.Tensor]
    compression: float | None = None  # against the dense model; None: from the masks (same shape)
    name: str | None = None


def _model_kwargs(config: BuildConfig, info: datasets.DatasetInfo) -> dict:
    return models.zoo_kwargs(info.input_shape, info.num_classes, config.width)


def _shifter_levels(config: BuildConfig, data: Dataset, store: PortfolioStore):
    torch.manual_seed(config.seed)
    model = models.build(config.model, _model_kwargs(config, data.info), allowed=(config.model,))
    for level in shifter.run_imp(model, data, config.train, config.shifter, store.work_dir):
        sparse = models.build(config.model, _model_kwargs(config, data.info), allowed=(config.model,))
        sparse.load_state_dict(level.state)
        yield SparseModel(level.level, sparse.eval(), level.masks)


def _reconvene_levels(config: BuildConfig, data: Dataset, store: PortfolioStore):
    """One composite model per compression, all pruned (and any impossible request refused) before the
    first is trained; each trains once, resumably, with the build's recipe."""
    settings = config.reconvene
    torch.manual_seed(config.seed)
    dense = models.build(config.model, _model_kwargs(config, data.info), allowed=(config.model,))
    example = datasets.normalize(data.train.images[:1], data.info.mean, data.info.std)
    batches = scorers.scoring_batches(
        settings.scorer, data, settings.score_batches, settings.score_batch_size, config.seed
    )
    for compression in settings.compressions:
        scorers.check_request(dense, settings.scorer, compression, batches)
    compressions = _planned_compressions(config)
    prepared = [
        reconvene.prune(
            dense,
            settings.scorer,
            c,
            example,
            batches,
            settings.threshold,
            settings.rounds,
            config.seed,
            settings.coverage,
        )
        for c in compressions
    ]
    if distributed.is_main():  # the per-group decisions, for the operator
        atomic_write_json(
            store.work_dir / "reconvene-decisions.json",
            [
                {
                    "compression": c,
                    "ready_s": pruned.seconds,
                    "rectified": list(pruned.rectified),
                    "groups": [asdict(d) for d in pruned.decisions],
                }
                for c, pruned in zip(compressions, prepared)
            ],
        )
    for level, (compression, pruned) in enumerate(zip(compressions, prepared)):
        log.info(
            "%s at %gx: %d of %d groups pruned structurally, ready to train in %.2f s",
            settings.scorer,
            compression,
            sum(d.insensitive for d in pruned.decisions),
            len(pruned.decisions),
            pruned.seconds,
        )
        model = train(
            pruned.model,
            data.info,
            data.train,
            config.train,
            masks=pruned.masks,
            checkpoint=store.work_dir / f"reconvene-{level}.pt",
            desc=f"reconvene {level}",
        )
        yield SparseModel(
            level,
            model.eval(),
            pruned.masks,
            compression=compression,
            name=f"{config.model}-{settings.scorer}-{compression:g}x",
        )


METHODS: dict[str, Callable] = {"shifter": _shifter_levels, "reconvene": _reconvene_levels}


def select_levels(compressions: list[float], targets: tuple[float, ...]) -> set[int]:
    """Indices of the levels nearest (in log scale) to each target compression; all when no targets."""
    if not targets:
        return set(range(len(compressions)))
    return {min(range(len(compressions)), key=lambda i: (abs(math.log(compressions[i] / t)), i)) for t in targets}


def _planned_compressions(config: BuildConfig) -> list[float]:
    """What each level will reach: reconvene's compressions in order; for the shifter, every level keeps
    1 - rate of the surviving weights."""
    if config.method == "reconvene":
        return sorted(set(config.reconvene.compressions))
    return [(1.0 - config.shifter.rate) ** -level for level in range(config.shifter.levels + 1)]


def _check_settings(config: BuildConfig, store: PortfolioStore) -> None:
    """A resumed build must use the settings it started with."""
    path = store.work_dir / "settings.json"
    settings = config.settings()
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if settings.get(k) != before.get(k))
            raise ValueError(
                f"{store.root} holds a build with other settings ({', '.join(changed)}); "
                "use another --out or remove its work/ folder"
            )
    else:
        store.work_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def derive_variant(
    sparse: SparseModel, config: BuildConfig, data: Dataset, store: PortfolioStore, dense_params: int
) -> VariantEntry:
    """Compact one sparse model, prove it equivalent, measure it and store it as a variant file."""
    shape = data.info.input_shape
    check = datasets.normalize(data.test.images[: config.check_images], data.info.mean, data.info.std)
    compact, report = surgery.compact(sparse.model, check[:1], check_inputs=check)
    sparse_acc = evaluate(sparse.model, data.info, data.test)
    compact_acc = evaluate(compact, data.info, data.test)
    level_sparsity = mask_sparsity(sparse.masks) if sparse.compression is None else 1.0 - 1.0 / sparse.compression
    spec = variant.VariantSpec(
        arch=config.model,
        kwargs=_model_kwargs(config, data.info),
        input_shape=shape,
        num_classes=data.info.num_classes,
        mean=data.info.mean,
        std=data.info.std,
        method=config.method,
        sparsity=level_sparsity,
        accuracy=compact_acc,
        name=sparse.name or f"{config.model}-L{sparse.level}",
        level=sparse.level,
        extra={"sparse_accuracy": sparse_acc},
    )  # nothing run-dependent: ids repeat
    variant_id = store.put_variant(variant.encode(compact, spec))
    params = models.count_params(compact)
    served = for_inference(copy.deepcopy(compact), tuple(shape))  # timed as an edge serves it by default
    return VariantEntry(
        variant_id=variant_id,
        name=spec.name,
        level=sparse.level,
        method=config.method,
        arch=config.model,
        params=params,
        size_bytes=store.variant_path(variant_id).stat().st_size,
        accuracy=compact_acc,
        sparse_accuracy=sparse_acc,
        sparsity=level_sparsity,
        compression=1.0 / max(1e-12, 1.0 - level_sparsity),
        params_ratio=dense_params / params,
        latency_ms_b1=measure_latency(served, shape, 1).p50_ms,
        latency_ms_b32=measure_latency(served, shape, 32, iters=10).p50_ms,
        max_abs_diff=report.max_abs_diff,
        macs=count_macs(compact, shape),
        sparse_params=models.count_params(sparse.model),
    )


def build(config: BuildConfig) -> Manifest | None:
    """Run the whole build; resumable, and atomic in what it publishes (the manifest goes last).
    Under torchrun every process trains its shard and rank 0 alone derives and publishes (the others
    return None)."""
    distributed.init_from_env()
    torch.set_num_threads(config.threads)
    store = PortfolioStore(config.out)
    if distributed.is_main():
        _check_settings(config, store)
    distributed.barrier()
    data = datasets.load(config.dataset, config.data_dir, seed=config.seed)
    data = Dataset(data.info, data.train.subset(config.subset, config.seed), data.val, data.test)
    dense_params = models.count_params(
        models.build(config.model, _model_kwargs(config, data.info), allowed=(config.model,))
    )
    entries = []
    levels = lookup(METHODS, "method", config.method)(config, data, store)
    keep = select_levels(_planned_compressions(config), config.targets)
    main = distributed.is_main()
    for sparse in tqdm(
        levels,
        desc=f"{config.method} portfolio",
        total=len(_planned_compressions(config)),
        unit="level",
        disable=not main,
    ):
        if not main or sparse.level not in keep:
            continue
        entry = derive_variant(sparse, config, data, store, dense_params)
        log.info(
            "%s: sparsity %.1f%%, %d params, accuracy %.2f%% (sparse %.2f%%)",
            entry.name,
            100 * entry.sparsity,
            entry.params,
            100 * entry.accuracy,
            100 * entry.sparse_accuracy,
        )
        entries.append(entry)
    manifest = Manifest(
        portfolio_id=portfolio_id([e.variant_id for e in entries]),
        model=config.model,
        dataset=config.dataset,
        method=config.method,
        created=time.time(),
        settings=config.settings(),
        variants=tuple(entries),
    )
    if not main:
        return None
    store.write_manifest(manifest)
    return manifest
