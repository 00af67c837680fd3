"""Datasets read from their original files; nothing is downloaded at run time.

Fashion-MNIST comes from its IDX files (Debian package `dataset-fashion-mnist`, or any directory that
holds the four files, gzipped or not); CIFAR-10 from its binary distribution (`cifar-10-batches-bin`).
Both are held in memory as uint8 `Split`s; `batches` normalizes on the fly, and augments training
batches of the datasets that call for it (CIFAR-10: random 32x32 crops of the 4-pixel zero-padded
image, random horizontal flips). Under data-parallel training each process takes its shard of every
epoch.

The kinds of split (`Split` in memory, `StreamSplit` read on demand; `common.splits`) and their
batching (`common.batching`) are re-exported here, where every caller finds them. Datasets the build
streams (image folders, datasets named by import path) are loaded by `cloud.build.data`.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from common.batching import augment, batches, channel_stats, index_batches, normalize
from common.registry import lookup
from common.splits import Dataset, DatasetError, DatasetInfo, Split, StreamSplit, head, seeded_parts

__all__ = [
    "CIFAR10", "FASHION_MNIST", "LOADERS", "Dataset", "DatasetError", "DatasetInfo", "Split", "StreamSplit",
    "augment", "batches", "channel_stats", "head", "index_batches", "load", "load_cifar10", "load_fashion_mnist",
    "normalize", "seeded_parts",
]  # fmt: skip

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (files land in "
    f"{FASHION_MNIST_DIR}) or pass --data-dir DIR with train-images-idx3-ubyte(.gz), "
    "train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
)
_IDX_DTYPES = {0x08: np.uint8}


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


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)  # fmt: skip
FASHION_MNIST = DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), classes=FASHION_MNIST_CLASSES)


def load_fashion_mnist(data_dir: Path | None = None, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Fashion-MNIST with a deterministic train/validation split of the 60k training images."""
    data_dir = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    train, val = _split_train_val(_idx_split(data_dir, "train"), val_fraction, seed)
    return Dataset(FASHION_MNIST, train, val, _idx_split(data_dir, "t10k"))


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
)  # fmt: skip
CIFAR10 = DatasetInfo(
    "cifar10",
    (3, 32, 32),
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    augment=True,
    classes=CIFAR10_CLASSES,
)
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
