"""What a dataset is to the build: its `DatasetInfo` and three splits of one of two kinds.

A `Split` holds its images in memory as uint8 [N, C, H, W] (Fashion-MNIST and CIFAR-10, read whole
from their files). A `StreamSplit` reads each example only when it is asked for: it is a torch
`Dataset` over a source `Dataset` of (uint8 [C, H, W] image, label) items and the positions of the
split's examples in it, so a folder of images is decoded by `DataLoader` workers and never held whole
in memory. Both kinds have a length, a seeded `subset`, `common.batching.batches` and `head` (their
first examples, for checks that need a few real inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset as TorchDataset

from common.errors import PrunefleetError


class DatasetError(PrunefleetError, RuntimeError):
    """A dataset file or folder that is missing, unreadable or unusable; the message names it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # random crop (padding 4) and horizontal flip while training
    classes: tuple[str, ...] = ()  # the name of each class, in label order (empty: unnamed)


def _subset_order(n: int, size: int, seed: int) -> torch.Tensor | None:
    """The positions of a seeded random subset of `size` out of `n` (None: all of them)."""
    if size <= 0 or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


@dataclass(frozen=True)
class Split:
    """Images as uint8 [N, C, H, W] and labels as int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, size: int, seed: int) -> Split:
        """A deterministic random subset of `size` examples (all of them if size >= len)."""
        order = _subset_order(len(self), size, seed)
        return self if order is None else Split(self.images[order], self.labels[order])


@dataclass(frozen=True, eq=False)
class StreamSplit(TorchDataset):
    """The examples of `source` at `indices`, read one by one: item i is `source[indices[i]]`, an
    (uint8 [C, H, W] image, int label) pair. `workers` is how many `DataLoader` worker processes
    read it when a caller does not say."""

    source: TorchDataset
    indices: torch.Tensor
    workers: int = 0

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.indices.dtype != torch.int64:
            shape = tuple(self.indices.shape)
            raise ValueError(f"indices must be 1-D int64, got {self.indices.dtype} of shape {shape}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[int(self.indices[i])]
        return image, int(label)

    def subset(self, size: int, seed: int) -> StreamSplit:
        """A deterministic random subset of `size` examples (all of them if size >= len), drawn as
        `Split.subset` draws."""
        order = _subset_order(len(self), size, seed)
        return self if order is None else replace(self, indices=self.indices[order])


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    train: Split | StreamSplit
    val: Split | StreamSplit
    test: Split | StreamSplit


def head(split: Split | StreamSplit, n: int) -> torch.Tensor:
    """The first `n` examples of the split (all, when it has fewer) as uint8 [n, C, H, W]."""
    if isinstance(split, Split):
        return split.images[:n]
    count = min(n, len(split))
    if count <= 0:
        raise ValueError(f"no examples to take: the split holds {len(split)} and {n} were asked for")
    return torch.stack([split[i][0] for i in range(count)])


def seeded_parts(n: int, val_fraction: float, seed: int, with_test: bool) -> tuple[torch.Tensor, ...]:
    """Positions 0..n-1 split by seed into (train, val) or, `with_test`, (train, val, test), the
    held-out parts val_fraction of n each, in seeded random order."""
    if not 0.0 < val_fraction < (0.5 if with_test else 1.0):
        limit = "0.5" if with_test else "1"
        raise ValueError(f"val_fraction must be in (0, {limit}) to split a set, got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * val_fraction))
    if with_test:
        return order[2 * k :], order[:k], order[k : 2 * k]
    return order[k:], order[:k]
