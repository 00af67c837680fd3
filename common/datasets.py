"""Datasets read from their original files; nothing is downloaded at run time.

Fashion-MNIST comes from its IDX files (Debian package `dataset-fashion-mnist`, or any directory that
holds the four files, gzipped or not); CIFAR-10 from its binary distribution (`cifar-10-batches-bin`).
Images stay uint8 in memory; `batches` normalizes on the fly, and augments training batches of the
datasets that call for it (CIFAR-10: random 32x32 crops of the 4-pixel zero-padded image, random
horizontal flips). Under data-parallel training each process takes its shard of every epoch.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import PrunefleetError
from common.registry import lookup

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (files land in "
    f"{FASHION_MNIST_DIR}) or pass --data-dir DIR with train-images-idx3-ubyte(.gz), "
    "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
)
_IDX_DTYPES = {0x08: np.uint8}


class DatasetError(PrunefleetError, RuntimeError):
    """A dataset file is missing or unreadable; the message says how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # random crop (padding 4) and horizontal flip while training


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
        if size <= 0 or size >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size]
        return Split(self.images[order], self.labels[order])


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    train: Split
    val: Split
    test: Split


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetError(f"cannot read {path}: {err}; {FASHION_MNIST_HINT}") from err
    if len(raw) < 4 + 4 * expected_dims:
        raise DatasetError(f"{path} is truncated; {FASHION_MNIST_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim != expected_dims:
        raise DatasetError(f"{path} is not an IDX file of {expected_dims} dims; {FASHION_MNIST_HINT}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(
            f"{path} holds {len(body)} bytes of data but its header declares {dims}; it is corrupt or "
            f"truncated; {FASHION_MNIST_HINT}"
        )
    return np.frombuffer(body, dtype=_IDX_DTYPES[dtype_code]).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}; {FASHION_MNIST_HINT}")


def _idx_split(data_dir: Path, prefix: str) -> Split:
    images = _read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"), 3)
    labels = _read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"), 1)
    if len(images) != len(labels):
        raise DatasetError(f"{prefix}: {len(images)} images but {len(labels)} labels; {FASHION_MNIST_HINT}")
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{prefix}: label {labels.max()} out of range; {FASHION_MNIST_HINT}")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _split_train_val(full: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(full) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(full.images[train_idx], full.labels[train_idx]), Split(full.images[val_idx], full.labels[val_idx])


FASHION_MNIST = DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,))


def load_fashion_mnist(data_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Fashion-MNIST with a deterministic train/validation split of the 60k training images."""
    data_dir = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    train, val = _split_train_val(_idx_split(data_dir, "train"), val_fraction, seed)
    return Dataset(FASHION_MNIST, train, val, _idx_split(data_dir, "t10k"))


CIFAR10 = DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True)
CIFAR10_HINT = (
    "pass --data-dir DIR holding CIFAR-10's binary distribution: data_batch_1.bin ... "
    "data_batch_5.bin and test_batch.bin (the cifar-10-batches-bin folder of cifar-10-binary.tar.gz)"
)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_file(path: Path) -> Split:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err}; {CIFAR10_HINT}") from err
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DatasetError(
            f"{path} holds {len(raw)} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 "
            f"records; it is corrupt or truncated"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DatasetError(f"{path}: label {labels.max()} out of range; is it CIFAR-100?")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def load_cifar10(data_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """CIFAR-10 from its binary batches, with a deterministic train/validation split of the 50k."""
    if data_dir is None:
        raise DatasetError(f"CIFAR-10 has no default location; {CIFAR10_HINT}")
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-bin").is_dir():
        data_dir = data_dir / "cifar-10-batches-bin"
    parts = [_cifar_file(data_dir / f"data_batch_{i}.bin") for i in range(1, 6)]
    full = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    train, val = _split_train_val(full, val_fraction, seed)
    return Dataset(CIFAR10, train, val, _cifar_file(data_dir / "test_batch.bin"))


LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}


def load(name: str, data_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    return lookup(LOADERS, "dataset", name)(data_dir, val_fraction=val_fraction, seed=seed)


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


def batches(
    split: Split,
    info: DatasetInfo,
    batch_size: int,
    shuffle_seed: int | None = None,
    shard: tuple[int, int] = (0, 1),
    train: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized (inputs, labels) batches; shuffled deterministically when a seed is given. With
    `shard=(rank, world)` this process gets every world-th example of the (padded) order, in batches of
    batch_size // world, so every process takes the same number of steps. `train` augments the
    datasets that call for it (deterministically, from the shuffle seed)."""
    rank, world = shard
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split over {world} processes")
    n = len(split)
    if shuffle_seed is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    if world > 1:
        order = torch.cat([order, order[: (-n) % world]])[rank::world]  # pad by wrapping, as samplers do
        batch_size //= world
    generator = torch.Generator().manual_seed((shuffle_seed or 0) * 7919 + rank)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx]
        if train and info.augment:
            images = augment(images, generator)
        yield normalize(images, info.mean, info.std), split.labels[idx]
