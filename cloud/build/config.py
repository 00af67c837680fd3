"""The settings of a build (`prunefleet portfolio build`'s flags): what it builds, from what, and how.

`BuildConfig` checks what it can before any work (the method, the model, the data, the device's form,
the given weights' files, the artifacts asked for); `settings` is what shapes the portfolio, which a
resumed build must match (`cloud.build.portfolio`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cloud.build import data as build_data
from cloud.build import devices
from cloud.build import weights as start_weights
from cloud.build.methods import METHODS
from cloud.build.settings import SettingsError
from cloud.build.train import TrainConfig
from common import models
from common.registry import lookup

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
    reference_weights: Path | None = field(
        default=None,
        metadata={
            "help": "for a method that prunes at initialization: trained weights of --model at --width (as "
            "--weights takes them) that are the dense model every variant is compared with, measured, not "
            "trained (none: the build trains the dense model with its own recipe to compare with)"
        },
    )
    dataset: str = field(default="fashion-mnist", metadata={"help": build_data.HELP})
    data_dir: Path | None = field(default=None, metadata={"help": "where the dataset's files are"})
    input_size: tuple[int, ...] = field(
        default=(), metadata={"help": "H,W the images are resized and cropped to (none: the dataset's own size)"}
    )
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes reading a streamed dataset"})
    subset: int = field(default=0, metadata={"help": "training examples to use (0: all)"})
    test_subset: int = field(
        default=0,
        metadata={
            "help": "test images every accuracy is measured on (0: all; else a seeded subset, the same for every "
            "level): a quicker build of a large test split, its accuracies as noisy as the subset is small"
        },
    )
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
        if min(self.subset, self.test_subset, self.workers) < 0 or self.threads <= 0 or self.check_images <= 0:
            raise SettingsError("subset, test_subset and workers must be >= 0; threads and check_images positive")
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
        if self.reference_weights is not None:
            if method.dense_level or method.weights_refusal is None:
                raise SettingsError(
                    f"--reference-weights is for a method that prunes at initialization; {method.name} compares "
                    "its variants with the dense model it starts from (give it --weights)"
                )
            start_weights.check_file(self.reference_weights)
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
        reference = self.reference_weights
        raw["reference_weights"] = start_weights.fingerprint(reference) if reference else None
        raw["train"].pop("progress")  # shows progress bars; the portfolio is the same either way
        return json.loads(json.dumps(raw, default=str))
