"""Build a portfolio: train, prune with a method, compact every sparse model, store the variants.

The build owns what every method shares: the data, the store and its resumable work directory, the
surgery that turns each sparse model into a compact variant (with its equivalence check), or the check
that a model the method made compact itself is what its file rebuilds (`cloud.build.derive`), the
portfolio's dense model every variant is compared with (`cloud.build.reference`), and measuring and
publishing the variants. What is pruned, and how, is the method's (`cloud.build.methods`): the build
hands it a `BuildContext` and the method's own settings, and takes the sparse models it yields.

Training and scoring run on the build's `--device` (`cloud.build.devices`), resolved and checked first,
before any data is loaded; everything after training (surgery, the equivalence check, accuracy of the
variants, timing, the files) runs on the CPU, as the edges do.

Every variant also gets its ONNX file by default (`--no-onnx` skips them; without the `onnx` extra a
build that would make them stops before any work, saying how to install it), and with `--int8` an
int8 member of its own (`cloud.build.artifacts`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cloud.build import data as build_data
from cloud.build import derive, devices, distributed, reference, timing
from cloud.build import weights as start_weights
from cloud.build.methods import METHODS
from cloud.build.methods.base import BuildContext, Method
from cloud.build.reference import Reference
from cloud.build.settings import SettingsError
from cloud.build.store import DenseEntry, Manifest, PortfolioStore, VariantEntry, served_portfolio_id
from cloud.build.timing import Member
from cloud.build.train import TrainConfig
from common import models
from common.files import atomic_write_json
from common.registry import lookup

log = logging.getLogger(__name__)
ONNX_PACKAGES = ("onnx", "onnxruntime")  # what making ONNX files needs: the `onnx` extra
MAX_CALIBRATION_IMAGES = 1 << 16


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
    onnx: bool = field(
        default=True,
        metadata={
            "help": "store each variant's ONNX file too, checked against it with ONNX Runtime and timed under it "
            "(needs pip install 'prunefleet[onnx]'); --no-onnx makes none"
        },
    )
    int8: bool = field(
        default=False,
        metadata={"help": "add each variant's statically quantized int8 ONNX form as a member of its own"},
    )
    calibration_images: int = field(
        default=1024, metadata={"help": "training images the int8 members' activation ranges are calibrated on"}
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
        self._check_artifacts()

    def _check_artifacts(self) -> None:
        """The ONNX files and int8 members asked for can be made here: refused before any work when
        `onnx` or `onnxruntime` is missing, naming how to install them or to skip them."""
        if not 1 <= self.calibration_images <= MAX_CALIBRATION_IMAGES:
            raise SettingsError(
                f"calibration_images must be in [1, {MAX_CALIBRATION_IMAGES}], got {self.calibration_images}"
            )
        if self.int8 and not self.onnx:
            raise SettingsError("--int8 quantizes each variant's ONNX file: it cannot go with --no-onnx")
        for package in ONNX_PACKAGES if self.onnx else ():
            try:
                importlib.import_module(package)
            except ImportError:
                raise SettingsError(
                    f"{package} is not installed: a build stores each variant's ONNX file unless told --no-onnx; "
                    "pip install 'prunefleet[onnx]' (or build with --no-onnx)"
                ) from None

    def settings(self) -> dict:
        """Everything that shapes the portfolio, as JSON: a resumed build must match it."""
        raw = asdict(self)
        raw.pop("out")
        raw.pop("device")  # where it trains: a build may resume on another device
        raw.pop("workers")  # how many processes read the data: the same batches either way
        raw.pop("onnx")  # which files are made of the variants, not the variants: a build may resume with them
        raw.pop("int8")
        raw["data_dir"] = str(self.data_dir) if self.data_dir else None
        raw["weights"] = start_weights.fingerprint(self.weights) if self.weights else None  # moves, never changes
        raw["train"].pop("progress")  # shows progress bars; the portfolio is the same either way
        return json.loads(json.dumps(raw, default=str))


def select_levels(compressions: list[float], targets: tuple[float, ...]) -> set[int]:
    """Indices of the levels nearest (in log scale) to each target compression; all when no targets."""
    if not targets:
        return set(range(len(compressions)))
    return {min(range(len(compressions)), key=lambda i: (abs(math.log(compressions[i] / t)), i)) for t in targets}


def changed_settings(config: BuildConfig) -> list[str]:
    """The settings in which the build started in `config.out` differs from `config` (none there: [])."""
    path = PortfolioStore(config.out).work_dir / "settings.json"
    if not path.exists():
        return []
    before, settings = json.loads(path.read_text()), config.settings()
    return sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))


def _check_settings(config: BuildConfig, store: PortfolioStore) -> None:
    """A resumed build must use the settings it started with."""
    changed = changed_settings(config)
    if changed:
        raise SettingsError(
            f"{store.root} holds a build with other settings ({', '.join(changed)}); "
            "use another --out or remove its work/ folder"
        )
    path = store.work_dir / "settings.json"
    if not path.exists():
        atomic_write_json(path, config.settings())


def _log(entry: VariantEntry) -> None:
    log.info(
        "%s (%s): sparsity %.1f%%, %d params, accuracy %.2f%% (sparse %.2f%%)",
        entry.name,
        entry.precision,
        100 * entry.sparsity,
        entry.params,
        100 * entry.accuracy,
        100 * entry.sparse_accuracy,
    )


def _levels(context: BuildContext, method: Method, dense_params: int) -> tuple[list[Member], Reference | None]:
    """The members made of the levels the method yields (those nearest the targets), and, for a
    method whose level 0 is the dense model, that level as the reference (kept or not). On rank 0
    only: the others train their shards and derive nothing."""
    config = context.config
    planned = method.planned_compressions(config.method_settings)
    keep = select_levels(planned, config.targets)
    main = distributed.is_main()
    members, dense = [], None
    levels = method.levels(context, config.method_settings)
    for sparse in tqdm(levels, desc=f"{method.name} portfolio", total=len(planned), unit="level", disable=not main):
        if not main:
            continue
        derived = derive.derive_variant(sparse, context, dense_params) if sparse.level in keep else []
        for member in derived:
            _log(member.entry)
        members.extend(derived)
        if method.dense_level and sparse.level == 0:
            known = derived[0].entry.sparse_accuracy if derived else None  # the dense model's accuracy, measured
            dense = reference.from_level(sparse, context, method.name, dense_params, known)
    return members, dense


def _derive(context: BuildContext, method: Method) -> tuple[list[VariantEntry], DenseEntry | None]:
    """The timed variants and the dense model they are compared with (nothing on ranks other than 0)."""
    dense_params = models.count_params(context.new_model())
    members, dense = _levels(context, method, dense_params)
    if not method.dense_level:
        dense = reference.trained(context)  # every torchrun process trains its shard
    if not distributed.is_main():
        return [], None
    if dense is None:
        raise reference.DenseReferenceError(
            f"method {method.name} says its level 0 is the dense model, but it yielded no level 0"
        )
    log.info(
        "dense model (%s): %d params, accuracy %.2f%%",
        dense.entry.source,
        dense.entry.params,
        100 * dense.entry.accuracy,
    )
    return timing.time_members(members, context.data.info.input_shape, (dense.entry, dense.served))


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
    entries, dense = _derive(context, lookup(METHODS, "method", config.method))
    if not distributed.is_main():
        return None
    manifest = Manifest(
        portfolio_id=served_portfolio_id(entries),
        model=config.model,
        dataset=config.dataset,
        method=config.method,
        created=time.time(),
        settings=config.settings(),
        variants=tuple(entries),
        dense=dense,
    )
    store.write_manifest(manifest)
    return manifest
