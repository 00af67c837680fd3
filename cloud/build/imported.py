"""Datasets named by import path (`--dataset package.module:function`), streamed like image folders.

The contract: the function is called as `function(data_dir=DIR_or_None, seed=SEED)` and returns
`(data, info)`:
- `data` is one map-style `torch.utils.data.Dataset` (split by seed into train, validation and test,
  `val_fraction` of it each for validation and test), or a dict with "train" and "test" Datasets and
  optionally "val" (without it, validation is held out of train by seed);
- every item is `(image, label)`: the image a uint8 tensor [C, H, W] (used as it is; all of one shape)
  or a PIL image (converted, resized and cropped to `--input-size` as image folders are, 1 channel
  when a seeded sample of the images is all grey, 3 otherwise), the label an integer class index;
- `info` is a dict with "classes" (the class names in label order, required) and optionally "mean"
  and "std" (per channel, of pixels scaled to [0, 1]; otherwise computed from a seeded sample of the
  training images as for image folders).
Anything else is refused with a message that names the path and what was wrong; an item that breaks
the contract while training raises `DatasetError` naming the path and the item.

Which paths may be imported is the caller's allow-list, as for models (`common.models`): the build
allows the path its operator named; a path not listed is refused before anything is imported.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from cloud.build import streamed
from common.datasets import Dataset, DatasetError
from common.errors import PrunefleetError
from common.registry import import_object, parse_import_path

SAMPLE = 100  # items looked at to choose channels and size
PARTS = frozenset({"train", "val", "test"})
INFO_KEYS = frozenset({"classes", "mean", "std"})


class DatasetNotAllowedError(PrunefleetError, ValueError):
    """A dataset import path that is well-formed but not on the caller's allow-list."""


def check_allowed(path: str, allowed: Collection[str]) -> None:
    """Raise unless `path` is a well-formed import path listed in `allowed`; never imports."""
    if isinstance(allowed, str):
        raise TypeError("allowed must be a collection of import paths, not one string")
    parse_import_path(path)
    if path not in allowed:
        raise DatasetNotAllowedError(
            f"dataset import path {path!r} is not allowed here (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )


def _is_dataset(value: object) -> bool:
    return isinstance(value, TorchDataset) and hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _call(path: str, data_dir: Path | None, seed: int) -> tuple[dict[str, TorchDataset], dict]:
    """The function's (parts, info), its shape checked: parts "all" or "train", "test" (and "val")."""
    function = import_object(path)
    if not callable(function):
        raise DatasetError(f"dataset {path!r} is not callable")
    try:
        result = function(data_dir=data_dir, seed=seed)
    except Exception as err:  # the user's code: report it by path, whatever it raised
        raise DatasetError(f"dataset {path!r} failed: {type(err).__name__}: {err}") from err
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DatasetError(f"dataset {path!r} must return (data, info), got {type(result).__name__}")
    data, info = result
    if _is_dataset(data):
        return {"all": data}, info
    if not isinstance(data, dict) or not {"train", "test"} <= set(data) <= PARTS:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DatasetError(
            f"dataset {path!r}: data must be a torch Dataset or a dict of 'train', 'test' (and 'val') Datasets, "
            f"got {keys}"
        )
    for part, value in data.items():
        if not _is_dataset(value):
            raise DatasetError(f"dataset {path!r}: data[{part!r}] is {type(value).__name__}, not a map-style Dataset")
    return dict(data), info


def _classes(info: object, path: str) -> tuple[str, ...]:
    """The class names of a well-formed info dict."""
    if not isinstance(info, dict) or not isinstance(info.get("classes"), (list, tuple)) or set(info) - INFO_KEYS:
        keys = sorted(map(str, info)) if isinstance(info, dict) else type(info).__name__
        raise DatasetError(f"dataset {path!r}: info must be a dict with 'classes' (and 'mean', 'std'), got {keys}")
    return streamed.check_classes(info["classes"], f"dataset {path!r}")


def _stats(info: dict, path: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) the info states, checked against the channels; None when it states neither."""
    if ("mean" in info) != ("std" in info):
        raise DatasetError(f"dataset {path!r}: info states one of 'mean' and 'std'; state both or neither")
    if "mean" not in info:
        return None
    mean, std = (_numbers(info[key], path, key, channels) for key in ("mean", "std"))
    if min(std) <= 0:
        raise DatasetError(f"dataset {path!r}: info['std'] must be positive, got {std}")
    return mean, std


def _numbers(value: object, path: str, key: str, channels: int) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != channels or not all(math.isfinite(v) for v in numbers):
        raise DatasetError(f"dataset {path!r}: info[{key!r}] must be {channels} finite numbers, got {value!r}")
    return numbers


def _label(label: object, path: str, where: str, num_classes: int) -> int:
    try:
        value = int(label)
        exact = value == label
    except (TypeError, ValueError, RuntimeError):
        exact = False
    if not exact or not 0 <= value < num_classes:
        raise DatasetError(f"dataset {path!r}: {where} has label {label!r}, not a class index in 0..{num_classes - 1}")
    return value


def _image(image: object, path: str, where: str) -> torch.Tensor | Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and min(image.shape) > 0:
        return image
    got = f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image)
    raise DatasetError(f"dataset {path!r}: {where} holds {got}; images must be uint8 tensors [C, H, W] or PIL images")


def _read(source: TorchDataset, index: int, path: str, num_classes: int) -> tuple[torch.Tensor | Image.Image, int]:
    """Item `index` of the user's dataset as a checked (image, label) pair."""
    where = f"item {index}"
    try:
        item = source[index]
    except DatasetError:
        raise
    except Exception as err:  # the user's code
        raise DatasetError(f"dataset {path!r}: reading {where} failed: {type(err).__name__}: {err}") from err
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DatasetError(f"dataset {path!r}: {where} is {type(item).__name__}, not an (image, label) pair")
    return _image(item[0], path, where), _label(item[1], path, where, num_classes)


class Items(TorchDataset):
    """A user dataset whose items are checked and made model input: uint8 [C, H, W] of `shape`."""

    def __init__(self, source: TorchDataset, shape: tuple[int, int, int], num_classes: int, path: str) -> None:
        self.source, self.shape, self.num_classes, self.path = source, shape, num_classes, path
        self.preprocess = streamed.Preprocess(shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = _read(self.source, index, self.path, self.num_classes)
        if isinstance(image, Image.Image):
            return self.preprocess(image), label
        if tuple(image.shape) != self.shape:
            raise DatasetError(f"dataset {self.path!r}: item {index} is {tuple(image.shape)}, the others {self.shape}")
        return image, label


def _shape(source: TorchDataset, path: str, num_classes: int, input_size: Sequence[int], seed: int) -> tuple:
    """(C, H, W) from a seeded sample of the items: a tensor's own shape, or PIL images' channels and
    `input_size` (else the size they all have)."""
    if len(source) == 0:
        raise DatasetError(f"dataset {path!r}: the training data is empty")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:SAMPLE]
    sample = [_read(source, int(i), path, num_classes)[0] for i in order]
    tensors = [image for image in sample if isinstance(image, torch.Tensor)]
    if tensors and len(tensors) < len(sample):
        raise DatasetError(f"dataset {path!r}: its images mix tensors and PIL images; use one kind")
    if not tensors:
        modes = Counter(image.mode for image in sample)
        sizes = Counter((image.height, image.width) for image in sample)
        return streamed.input_shape(streamed.channels_for(modes, path), sizes, input_size, path)
    shapes = Counter(tuple(image.shape) for image in tensors)
    if len(shapes) > 1:
        raise DatasetError(f"dataset {path!r}: its tensor images come in {len(shapes)} shapes: {sorted(shapes)[:3]}")
    (shape,) = shapes
    if input_size and tuple(input_size) != shape[1:]:
        raise DatasetError(
            f"dataset {path!r}: its tensor images are {shape[1]}x{shape[2]}; --input-size {input_size[0]},"
            f"{input_size[1]} resizes PIL images only (leave it out, or return PIL images)"
        )
    return shape


def load(
    path: str,
    data_dir: Path | None = None,
    *,
    allowed: Collection[str] = (),
    input_size: Sequence[int] = (),
    seed: int = 0,
    val_fraction: float = 0.1,
    workers: int = 0,
) -> Dataset:
    """The dataset `path` names, when `allowed`, as streamed splits read by `workers` processes."""
    check_allowed(path, allowed)
    raw, info = _call(path, data_dir, seed)
    classes = _classes(info, path)
    shape = _shape(raw.get("all", raw.get("train")), path, len(classes), input_size, seed)
    stated = _stats(info, path, shape[0])
    parts = {name: Items(source, shape, len(classes), path) for name, source in raw.items()}
    splits = streamed.splits(parts, seed, val_fraction, workers)
    return streamed.dataset(path, classes, shape, splits, seed, path, stated)
