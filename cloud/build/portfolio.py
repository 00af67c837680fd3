"""Build a portfolio: train, prune with a method, compact every sparse model, store the variants.

The build owns what every method shares: the data, the store and its resumable work directory, the
surgery that turns each sparse model into a compact variant (with its equivalence check), and
measuring and publishing the variants. What is pruned, and how, is the method's
(`cloud.build.methods`): the build hands it a `BuildContext` and the method's own settings, and takes
the sparse models it yields.

Training and scoring run on the build's `--device` (`cloud.build.devices`), resolved and checked first,
before any data is loaded; everything after training (surgery, the equivalence check, accuracy of the
variants, timing, the files) runs on the CPU, as the edges do.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cloud.build import data as build_data
from cloud.build import devices, distributed
from cloud.build import weights as start_weights
from cloud.build.compaction import surgery
from cloud.build.methods import METHODS
from cloud.build.methods.base import BuildContext, Method, SparseModel
from cloud.build.methods.masks import sparsity as mask_sparsity
from cloud.build.settings import SettingsError
from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from cloud.build.train import TrainConfig, evaluate
from common import datasets, models, variant
from common.files import atomic_write_json
from common.inference import for_inference
from common.profiling import count_macs, measure_interleaved
from common.registry import lookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    """The settings of a build: the common ones (each a `portfolio build` flag), the training recipe,
    and the chosen method's own settings (an instance of that method's settings dataclass)."""

    out: Path = field(metadata={"help": "the portfolio store directory (created; an unfinished build there resumes)"})
    method: str = field(
        default="shifter", metadata={"help": "pruning method; its settings are the flags of its group below"}
    )
    model: str = field(
        default="vgg11",
        metadata={"help": "zoo name (vgg11, resnet20, mobilenetv2, ...), torchvision:NAME or package.module:function"},
    )
    width: float | None = field(
        default=None,
        metadata={"help": "channel width multiplier (none: the model's own, 0.25 for the zoo, 1.0 for torchvision)"},
    )
    weights: Path | None = field(
        default=None,
        metadata={
            "help": "start from these trained weights of --model at --width (a .safetensors state dict, an "
            "uncompacted variant file, or a torch state dict; at most "
            f"{start_weights.MAX_WEIGHTS_BYTES >> 30} GiB): the dense model is this one, "
            "not trained again; methods that prune at initialization refuse it"
        },
    )
    dataset: str = field(default="fashion-mnist", metadata={"help": build_data.HELP})
    data_dir: Path | None = field(default=None, metadata={"help": "where the dataset's files are"})
    input_size: tuple[int, ...] = field(
        default=(), metadata={"help": "H,W the images are resized and cropped to (none: the dataset's own size)"}
    )
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes reading a streamed dataset"})
    subset: int = field(default=0, metadata={"help": "training examples to use (0: all)"})
    threads: int = field(default=2, metadata={"help": "CPU threads of this process"})
    device: str = field(
        default="auto",
        metadata={
            "help": "where training and scoring run: auto (a GPU when there is one, else the CPU), cpu, cuda or "
            "cuda:N; under torchrun auto and cuda take the GPU of each process's LOCAL_RANK"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the initialization, the data subset and its order"})
    check_images: int = field(default=256, metadata={"help": "real test images the surgery equivalence check runs on"})
    targets: tuple[float, ...] = field(
        default=(),
        metadata={"help": "keep only the levels nearest these compressions, e.g. 1,2,4,8 (none: every level)"},
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"cli": False})
    method_settings: object = field(default=None, metadata={"cli": False})  # None: the method's defaults

    def __post_init__(self) -> None:
        method = lookup(METHODS, "method", self.method)
        models.resolve(self.model, allowed=(self.model,))  # the operator typed it: an import path is allowed
        if self.subset < 0 or self.threads <= 0 or self.check_images <= 0 or self.workers < 0:
            raise SettingsError("subset and workers must be >= 0; threads and check_images positive")
        build_data.check(self.dataset, self.data_dir, self.input_size)
        devices.check_form(self.device)
        if self.train.amp and self.device == "cpu":
            raise SettingsError("mixed precision (--amp) needs a CUDA device, not --device cpu")
        if any(not t >= 1 for t in self.targets):
            raise SettingsError(f"target compressions must be >= 1, got {self.targets}")
        if self.method_settings is None:
            object.__setattr__(self, "method_settings", method.settings())
        if type(self.method_settings) is not method.settings:
            raise SettingsError(
                f"method {self.method!r} takes {method.settings.__name__} settings, "
                f"got {type(self.method_settings).__name__}"
            )
        if self.weights is not None:
            method.refuse_weights(self.method_settings)
            start_weights.check_file(self.weights)

    def settings(self) -> dict:
        """Everything that shapes the portfolio, as JSON: a resumed build must match it."""
        raw = asdict(self)
        raw.pop("out")
        raw.pop("device")  # where it trains: a build may resume on another device
        raw.pop("workers")  # how many processes read the data: the same batches either way
        raw["data_dir"] = str(self.data_dir) if self.data_dir else None
        raw["weights"] = start_weights.fingerprint(self.weights) if self.weights else None  # moves, never changes
        raw["train"].pop("progress")  # shows progress bars; the portfolio is the same either way
        return json.loads(json.dumps(raw, default=str))


def select_levels(compressions: list[float], targets: tuple[float, ...]) -> set[int]:
    """Indices of the levels nearest (in log scale) to each target compression; all when no targets."""
    if not targets:
        return set(range(len(compressions)))
    return {min(range(len(compressions)), key=lambda i: (abs(math.log(compressions[i] / t)), i)) for t in targets}


def _check_settings(config: BuildConfig, store: PortfolioStore) -> None:
    """A resumed build must use the settings it started with."""
    path = store.work_dir / "settings.json"
    settings = config.settings()
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if settings.get(k) != before.get(k))
            raise SettingsError(
                f"{store.root} holds a build with other settings ({', '.join(changed)}); "
                "use another --out or remove its work/ folder"
            )
    else:
        atomic_write_json(path, settings)


def derive_variant(sparse: SparseModel, context: BuildContext, dense_params: int) -> tuple[VariantEntry, nn.Module]:
    """Compact one sparse model, prove it equivalent, measure it and store it as a variant file. The
    entry's latencies are left at 0 for `time_variants`, with the model as an edge serves it."""
    config, data, store = context.config, context.data, context.store
    sparse.model.cpu()  # surgery, its check and the measurements run where the edges run variants
    shape = data.info.input_shape
    check = datasets.normalize(datasets.head(data.test, config.check_images), data.info.mean, data.info.std)
    compact, report = surgery.compact(sparse.model, check[:1], check_inputs=check)
    sparse_acc = evaluate(sparse.model, data.info, data.test)
    compact_acc = evaluate(compact, data.info, data.test)
    level_sparsity = mask_sparsity(sparse.masks) if sparse.compression is None else 1.0 - 1.0 / sparse.compression
    spec = variant.VariantSpec(
        arch=config.model,
        kwargs=context.model_kwargs(),
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
        classes=data.info.classes,
    )  # nothing run-dependent: ids repeat
    variant_id = store.put_variant(variant.encode(compact, spec))
    params = models.count_params(compact)
    served = for_inference(copy.deepcopy(compact), tuple(shape))  # timed as an edge serves it by default
    entry = VariantEntry(
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
        latency_ms_b1=0.0,
        latency_ms_b32=0.0,
        max_abs_diff=report.max_abs_diff,
        macs=count_macs(compact, shape),
        sparse_params=models.count_params(sparse.model),
    )
    return entry, served


def time_variants(entries: list[VariantEntry], served: list[nn.Module], shape: tuple) -> list[VariantEntry]:
    """Every variant's latency at batch 1 and 32, timed together in interleaved rounds once all are
    built: timed one by one as each is derived, minutes apart, the machine's load of the moment would
    rank variants of the same architecture against each other. The quartiles say where two variants
    cannot be told apart."""
    spreads = {
        batch: measure_interleaved({e.variant_id: m for e, m in zip(entries, served)}, tuple(shape), batch, iters=iters)
        for batch, iters in ((1, 4), (32, 2))
    }
    timed = []
    for entry in entries:
        b1, b32 = spreads[1][entry.variant_id], spreads[32][entry.variant_id]
        timed.append(
            replace(
                entry,
                latency_ms_b1=b1.p50_ms,
                latency_ms_b1_q1=b1.q1_ms,
                latency_ms_b1_q3=b1.q3_ms,
                latency_ms_b32=b32.p50_ms,
                latency_ms_b32_q1=b32.q1_ms,
                latency_ms_b32_q3=b32.q3_ms,
            )
        )
    return timed


def _derive(context: BuildContext, method: Method) -> list[VariantEntry]:
    """The variants of the levels the method yields (those nearest the targets); on rank 0 only, the
    others train their shards and derive nothing."""
    config = context.config
    planned = method.planned_compressions(config.method_settings)
    keep = select_levels(planned, config.targets)
    dense_params = models.count_params(context.new_model())
    main = distributed.is_main()
    entries, served = [], []
    levels = method.levels(context, config.method_settings)
    for sparse in tqdm(levels, desc=f"{method.name} portfolio", total=len(planned), unit="level", disable=not main):
        if not main or sparse.level not in keep:
            continue
        entry, model = derive_variant(sparse, context, dense_params)
        log.info(
            "%s: sparsity %.1f%%, %d params, accuracy %.2f%% (sparse %.2f%%)",
            entry.name,
            100 * entry.sparsity,
            entry.params,
            100 * entry.accuracy,
            100 * entry.sparse_accuracy,
        )
        entries.append(entry)
        served.append(model)
    return time_variants(entries, served, context.data.info.input_shape) if entries else entries


def _device(config: BuildConfig) -> torch.device:
    """The build's device on this machine (each torchrun process its own GPU); raises DeviceError for a
    GPU that is not there and refuses --amp off CUDA, both before any data is loaded."""
    device = devices.resolve(config.device, distributed.local_rank())
    if config.train.amp and device.type != "cuda":
        raise devices.DeviceError(f"mixed precision (--amp) needs a CUDA device; --device {config.device} is {device}")
    log.info("training and scoring on %s", device)
    return device


def build(config: BuildConfig) -> Manifest | None:
    """Run the whole build; resumable, and atomic in what it publishes (the manifest goes last).
    Under torchrun every process trains its shard and rank 0 alone derives and publishes (the others
    return None)."""
    device = _device(config)
    distributed.init_from_env(device)
    torch.set_num_threads(config.threads)
    store = PortfolioStore(config.out)
    context = BuildContext(config, build_data.for_build(config), store, device)
    build_data.check_model_input(config.model, context.new_model, context.data.info)
    with torch.random.fork_rng(devices=[]):
        context.trained_model()  # weights that do not fit are refused before the build writes anything
    if distributed.is_main():
        _check_settings(config, store)
    distributed.barrier()
    entries = _derive(context, lookup(METHODS, "method", config.method))
    if not distributed.is_main():
        return None
    manifest = Manifest(
        portfolio_id=portfolio_id([e.variant_id for e in entries]),
        model=config.model,
        dataset=config.dataset,
        method=config.method,
        created=time.time(),
        settings=config.settings(),
        variants=tuple(entries),
    )
    store.write_manifest(manifest)
    return manifest
