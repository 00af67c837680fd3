"""The build's data: every dataset `portfolio build --dataset` accepts, loaded by one `load`.

- `fashion-mnist` (the default) and `cifar10`: read whole into memory by `common.datasets`, at their
  own size (`--input-size`, if given, must be that size).
- `imagefolder`: a folder of class folders of PNG or JPEG files (`--data-dir`), streamed
  (`cloud.build.imagefolder`).
- `package.module:function`: a dataset of the operator's own, streamed (`cloud.build.imported`, which
  states the function's contract); allowed when the caller lists it (the build lists the path its
  operator named).

`check` refuses bad settings before anything is read or imported, and `check_model_input` an input
shape the model cannot take before any training, so a build fails at once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cloud.build import imagefolder, images, imported
from cloud.build.settings import SettingsError
from common import datasets
from common.datasets import Dataset, DatasetInfo
from common.registry import UnknownNameError, is_import_path, parse_import_path

if TYPE_CHECKING:
    from cloud.build.config import BuildConfig

IMAGE_FOLDER = "imagefolder"
NAMES = (*sorted(datasets.LOADERS), IMAGE_FOLDER)
HELP = (
    "fashion-mnist (in memory), cifar10 (in memory, --data-dir), imagefolder (--data-dir DIR of class folders "
    "of PNG/JPEG, streamed) or package.module:function (a dataset of your own, streamed)"
)
_OWN_SIZE = {"fashion-mnist": datasets.FASHION_MNIST.input_shape[1:], "cifar10": datasets.CIFAR10.input_shape[1:]}


def check(name: str, data_dir: Path | None = None, input_size: Sequence[int] = ()) -> None:
    """Refuse an unknown dataset name, a malformed import path, an image folder without a directory,
    or an input size that is not (H, W) within bounds, or not the own size of an in-memory dataset."""
    if is_import_path(name):
        parse_import_path(name)
    elif name not in NAMES:
        raise UnknownNameError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}, or package.module:function")
    if name == IMAGE_FOLDER and data_dir is None:
        raise SettingsError("--dataset imagefolder needs --data-dir DIR (one sub-folder of PNG/JPEG files per class)")
    if not input_size:
        return
    if len(input_size) != 2 or not all(1 <= int(side) <= images.MAX_SIDE for side in input_size):
        raise SettingsError(f"--input-size takes H,W, each within 1..{images.MAX_SIDE}; got {tuple(input_size)}")
    own = _OWN_SIZE.get(name)
    if name in datasets.LOADERS and tuple(input_size) != own:
        size = f"{own[0]},{own[1]}" if own else "its own"
        raise SettingsError(
            f"--input-size {input_size[0]},{input_size[1]}: {name} is used at its own size ({size}); "
            "--input-size is for imagefolder and import-path datasets"
        )


def load(
    name: str,
    data_dir: Path | None = None,
    *,
    input_size: Sequence[int] = (),
    seed: int = 0,
    val_fraction: float = 0.1,
    workers: int = 0,
    allowed: Collection[str] | None = None,
) -> Dataset:
    """The dataset `name` (see the module docstring); streamed ones are read by `workers` DataLoader
    processes. An import path is imported only if `allowed` lists it (None: the path itself, for the
    operator who named it)."""
    check(name, data_dir, input_size)
    if name in datasets.LOADERS:
        return datasets.load(name, data_dir, val_fraction=val_fraction, seed=seed)
    options = {"input_size": tuple(input_size), "seed": seed, "val_fraction": val_fraction, "workers": workers}
    if name == IMAGE_FOLDER:
        return imagefolder.load(data_dir, **options)
    return imported.load(name, data_dir, allowed=(name,) if allowed is None else allowed, **options)


TEST_SUBSET_SEED = 0


def for_build(config: BuildConfig) -> Dataset:
    """A build's data: its dataset at its input size, read by its workers, the training split cut to
    its `--subset` (seeded by `--seed`) and the test split to its `--test-subset` (the same images
    whatever the seed, as `bench.workdir` cuts it: builds of other seeds are measured alike)."""
    data = load(config.dataset, config.data_dir, input_size=config.input_size, seed=config.seed, workers=config.workers)
    train = data.train.subset(config.subset, config.seed)
    test = data.test.subset(config.test_subset, TEST_SUBSET_SEED)
    return Dataset(data.info, train, data.val, test)


def check_model_input(name: str, new_model: Callable[[], nn.Module], info: DatasetInfo) -> None:
    """Refuse, before any training, an input shape the model cannot take: one forward pass of zeros
    through a fresh model (made without touching torch's random state) on the CPU."""
    with torch.random.fork_rng(devices=[]):
        model = new_model().cpu().eval()
    shape = tuple(info.input_shape)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as err:  # whatever torch (or the user's model) raised says why
        raise SettingsError(
            f"model {name!r} cannot take inputs of shape {shape} (C, H, W) from {info.name}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, info.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SettingsError(f"model {name!r} gives {got} for one input of {shape}, not (1, {info.num_classes}) logits")
