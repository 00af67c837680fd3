"""What every streamed dataset (image folders, datasets named by import path) shares.

- The number of channels: 1 when every image looked at is grey, otherwise 3 (each image is then
  converted to that mode, with a log line when the images were mixed).
- The input size: `--input-size H,W` when given, otherwise the size the images agree on (refused,
  asking for `--input-size`, when they do not).
- Class names checked before any training, as the variant file will check them.
- The `DatasetInfo`: its mean and std are those a dataset states, or computed per channel from a
  seeded sample of up to `STATS_SAMPLE` training images after resizing (the same numbers for the same
  data and seed, so a resumed build gets them again); streamed datasets are not augmented.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from cloud.build import images
from common import variant
from common.datasets import Dataset, DatasetError, DatasetInfo, StreamSplit, channel_stats, seeded_parts

log = logging.getLogger(__name__)

STATS_SAMPLE = 1000
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def channels_for(modes: Counter, where: str) -> int:
    """1 when every image mode counted is grey, else 3; logs what mixed images are converted to."""
    grey = sum(n for mode, n in modes.items() if mode in GREY_MODES)
    colour = sum(modes.values()) - grey
    channels = 3 if colour else 1
    if grey and colour:
        log.info("%s: %d grey and %d colour images; every image is converted to RGB (3 channels)", where, grey, colour)
    else:
        log.info("%s: %s images, %d channel(s)", where, "colour" if colour else "grey", channels)
    return channels


def input_shape(channels: int, sizes: Counter, input_size: Sequence[int], where: str) -> tuple[int, int, int]:
    """(C, H, W) from `input_size` (H, W) when given, else from the one (H, W) every image has."""
    if input_size:
        height, width = input_size
        return channels, int(height), int(width)
    if len(sizes) != 1:
        shown = ", ".join(f"{h}x{w}" for (h, w), _ in sizes.most_common(3))
        raise DatasetError(
            f"{where}: the images come in {len(sizes)} sizes (H x W: {shown}, ...); "
            "pass --input-size H,W to resize and crop them all to one"
        )
    (height, width), _ = sizes.most_common(1)[0]
    return channels, height, width


def check_classes(classes: Sequence[str], where: str) -> tuple[str, ...]:
    """The class names as a tuple, refused unless there are at least two, each printable text that a
    variant file can carry."""
    classes = tuple(classes)
    if len(classes) < 2:
        raise DatasetError(f"{where}: {len(classes)} class(es) {list(classes)}; a classifier needs at least two")
    for name in classes:
        if not isinstance(name, str) or not name or len(name) > variant.MAX_CLASS_NAME_CHARS or not name.isprintable():
            raise DatasetError(
                f"{where}: class name {str(name)[:40]!r} must be printable text of 1 to "
                f"{variant.MAX_CLASS_NAME_CHARS} characters"
            )
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{where}: class names repeat: {sorted(n for n, c in Counter(classes).items() if c > 1)}")
    return classes


class Preprocess:
    """A PIL image to model input, uint8 [C, H, W], exactly as `prunefleet predict` makes it."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.require(images.preprocess(image, self.shape), requirements="W"))  # writable


def splits(
    parts: dict[str, TorchDataset], seed: int, val_fraction: float, workers: int
) -> tuple[StreamSplit, StreamSplit, StreamSplit]:
    """Train, validation and test splits of the `parts` a dataset came in: "all" alone (split by seed:
    val_fraction each for validation and test), or "train" with "val" and/or "test" (validation alone
    is the test split too; test alone: validation is held out of train by seed). Held-out and given
    validation and test splits are in a seeded order, so their first images span the classes."""

    def stream(source: TorchDataset, indices: torch.Tensor) -> StreamSplit:
        return StreamSplit(source, indices, workers)

    def shuffled(source: TorchDataset) -> StreamSplit:
        return stream(source, torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)))

    if "all" in parts:
        return tuple(stream(parts["all"], p) for p in seeded_parts(len(parts["all"]), val_fraction, seed, True))
    train = parts["train"]
    if "val" not in parts:
        train_idx, val_idx = seeded_parts(len(train), val_fraction, seed, with_test=False)
        return stream(train, train_idx), stream(train, val_idx), shuffled(parts["test"])
    val = shuffled(parts["val"])
    test = shuffled(parts["test"]) if "test" in parts else val
    return stream(train, torch.arange(len(train))), val, test


def dataset(
    name: str,
    classes: tuple[str, ...],
    shape: tuple[int, int, int],
    parts: tuple[StreamSplit, StreamSplit, StreamSplit],
    seed: int,
    where: str,
    stated: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Dataset:
    """The dataset, refused when a split is empty; mean and std as `stated`, else computed from a
    seeded sample of the training split."""
    for part, split in zip(("training", "validation", "test"), parts):
        if len(split) == 0:
            raise DatasetError(f"{where}: the {part} split is empty; it needs more images")
    train = parts[0]
    if stated is None:
        mean, std = channel_stats(train, STATS_SAMPLE, seed, train.workers)
        log.info("%s: mean %s, std %s from %d training images", where, mean, std, min(STATS_SAMPLE, len(train)))
    else:
        mean, std = (tuple(float(v) for v in values) for values in stated)
    info = DatasetInfo(name, shape, len(classes), mean, std, augment=False, classes=classes)
    return Dataset(info, *parts)
