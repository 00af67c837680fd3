"""Normalized, augmented, per-rank batches of either kind of split, and the statistics of a sample.

Both kinds of split share one plan of index batches (`index_batches`): the order (as stored, or a
seeded shuffle), every world-th example of it under data-parallel training, and the batch size.

- A `Split` (in memory) is batched in this process: gathered, augmented from one generator seeded by
  the shuffle seed and rank, normalized.
- A `StreamSplit` is batched by a `torch.utils.data.DataLoader` whose batch sampler is that plan:
  its workers read and decode the examples, stack them, augment them (each batch from a generator of
  its own, seeded by the shuffle seed, rank and batch number) and normalize them. Batches therefore
  come out the same whatever the number of workers, zero (this process) included.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from common.splits import DatasetError, DatasetInfo, Split, StreamSplit


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] pixels to float32, scaled to [0, 1] and normalized per channel."""
    x = images.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded uint8 images at their own size, and random horizontal flips."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)
    cols = dx.view(n, 1) + torch.arange(w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channel, rows, cols]


def index_batches(
    n: int, batch_size: int, shuffle_seed: int | None = None, shard: tuple[int, int] = (0, 1)
) -> list[torch.Tensor]:
    """The positions of each batch this process takes from a split of `n` examples: shuffled when a
    seed is given; with `shard=(rank, world)` every world-th example of the order (padded by wrapping,
    as samplers do, so every process takes the same number of steps) in batches of batch_size // world."""
    rank, world = shard
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split over {world} processes")
    if shuffle_seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    if world > 1:
        order = torch.cat([order, order[: (-n) % world]])[rank::world]
        batch_size //= world
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _augment_seed(shuffle_seed: int | None, rank: int) -> int:
    return (shuffle_seed or 0) * 7919 + rank


def batches(
    split: Split | StreamSplit,
    info: DatasetInfo,
    batch_size: int,
    shuffle_seed: int | None = None,
    shard: tuple[int, int] = (0, 1),
    train: bool = False,
    workers: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized (inputs, labels) batches in the order of `index_batches`. `train` augments the
    datasets that call for it (deterministically, from the shuffle seed). A streamed split is read by
    `workers` DataLoader processes (None: the split's own number; 0: this process)."""
    plan = index_batches(len(split), batch_size, shuffle_seed, shard)
    seed = _augment_seed(shuffle_seed, shard[0]) if train and info.augment else None
    if isinstance(split, StreamSplit):
        yield from _streamed(split, info, plan, seed, split.workers if workers is None else workers)
        return
    generator = torch.Generator().manual_seed(_augment_seed(shuffle_seed, shard[0]))
    for idx in plan:
        images = split.images[idx]
        if seed is not None:
            images = augment(images, generator)
        yield normalize(images, info.mean, info.std), split.labels[idx]


class _Numbered(TorchDataset):
    """A streamed split whose items are asked for as (batch number, position) and come with the
    batch number, so the collate function can seed each batch's augmentation by it."""

    def __init__(self, split: StreamSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        number, position = key
        image, label = self.split[position]
        return image, label, number


class _Collate:
    """Stacks one batch of (image, label, batch number) items, checks their shape, augments them when
    given a seed (mixed with the batch number) and normalizes them; runs in the DataLoader workers."""

    def __init__(self, info: DatasetInfo, seed: int | None) -> None:
        self.info, self.seed = info, seed

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.info.input_shape
        for image, _, _ in items:
            if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.shape != shape:
                got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
                raise DatasetError(f"dataset {self.info.name}: an image is {got}, expected uint8 {shape}")
        images = torch.stack([image for image, _, _ in items])
        labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
        if self.seed is not None:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + items[0][2]) % 2**63)
            images = augment(images, generator)
        return normalize(images, self.info.mean, self.info.std), labels


def _streamed(
    split: StreamSplit, info: DatasetInfo, plan: list[torch.Tensor], seed: int | None, workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    sampler = [[(number, int(i)) for i in idx] for number, idx in enumerate(plan)]
    yield from DataLoader(_Numbered(split), batch_sampler=sampler, num_workers=workers, collate_fn=_Collate(info, seed))


def _stack(items: list) -> torch.Tensor:
    return torch.stack([image for image, _ in items])


def channel_stats(
    split: Split | StreamSplit, count: int = 1000, seed: int = 0, workers: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels (scaled to [0, 1]) of a seeded sample of
    up to `count` examples: the same numbers for the same split and seed, whatever `workers`."""
    sample = split.subset(count, seed)
    if isinstance(sample, Split):
        chunks = [sample.images[i : i + 256] for i in range(0, len(sample), 256)]
    else:
        chunks = DataLoader(sample, batch_size=64, num_workers=workers, collate_fn=_stack)
    total = squares = None
    pixels = 0
    for chunk in chunks:
        x = chunk.to(torch.float64).div_(255.0)
        part, part_sq = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, squares = (part, part_sq) if total is None else (total + part, squares + part_sq)
        pixels += x.numel() // x.shape[1]
    if not pixels:
        raise DatasetError("cannot compute the mean and std of an empty split")
    mean = total / pixels
    var = (squares / pixels - mean.square()).clamp_min(0.0)
    std = [max(math.sqrt(v), 1e-3) for v in var.tolist()]  # a constant channel still divides safely
    return tuple(round(m, 6) for m in mean.tolist()), tuple(round(s, 6) for s in std)
