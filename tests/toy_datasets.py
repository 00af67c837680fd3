"""Real images for the streamed-dataset tests: Fashion-MNIST test images written as PNG class folders,
and datasets named by import path (`toy_datasets:fashion_tensors`, ...), the way an operator's own
module would define them."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from common import datasets

COUNT = 300  # the first test images: every class, about 30 each
FOLDERS = tuple(name.replace("/", "-") for name in datasets.FASHION_MNIST_CLASSES)


@functools.cache
def source(count: int = COUNT) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` Fashion-MNIST test images, uint8 [N, 28, 28], and their labels."""
    test = datasets.load_fashion_mnist().test
    return test.images[:count, 0].numpy(), test.labels[:count].numpy()


def coloured(grey: np.ndarray) -> np.ndarray:
    """A grey image as RGB uint8 [28, 36, 3]: three different channels, padded with 4 black columns
    on each side."""
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    return np.pad(rgb, ((0, 0), (4, 4), (0, 0)))


def write_tree(root: Path, indices, colour: bool = False) -> Path:
    """The source images at `indices` as root/<class>/<index>.png (grey, or `coloured`)."""
    images, labels = source()
    for i in indices:
        folder = root / FOLDERS[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = coloured(images[i]) if colour else images[i]
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def index_of(path: str) -> int:
    """The source index a written file holds."""
    return int(Path(path).stem)


def expected(path: str, colour: bool = False) -> torch.Tensor:
    """The uint8 [C, H, W] pixels of the written file, from the source."""
    pixels = source()[0][index_of(path)]
    return torch.from_numpy(coloured(pixels).transpose(2, 0, 1).copy() if colour else pixels[None].copy())


class _Pairs(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def fashion_tensors(data_dir=None, seed=0):
    """One dataset of uint8 tensor images, split by the build."""
    images, labels = source()
    items = [(torch.from_numpy(images[i][None].copy()), int(labels[i])) for i in range(COUNT)]
    return _Pairs(items), {"classes": list(FOLDERS)}


def fashion_pictures(data_dir=None, seed=0):
    """Train and test parts of colour PIL images, with the mean and std stated."""
    images, labels = source()
    items = [(Image.fromarray(coloured(images[i])), int(labels[i])) for i in range(COUNT)]
    info = {"classes": list(FOLDERS), "mean": [0.3, 0.2, 0.6], "std": [0.3, 0.2, 0.3]}
    return {"train": _Pairs(items[:250]), "test": _Pairs(items[250:])}, info


def no_pair(data_dir=None, seed=0):
    return _Pairs([torch.zeros(1, 28, 28, dtype=torch.uint8)] * 20), {"classes": ["a", "b"]}


def float_images(data_dir=None, seed=0):
    return _Pairs([(torch.zeros(1, 28, 28), 0)] * 20), {"classes": ["a", "b"]}


def label_out_of_range(data_dir=None, seed=0):
    items = [(torch.zeros(1, 8, 8, dtype=torch.uint8), i % 3) for i in range(40)]
    return _Pairs(items), {"classes": ["a", "b"]}


def no_classes(data_dir=None, seed=0):
    return fashion_tensors()[0], {"names": list(FOLDERS)}


def only_train(data_dir=None, seed=0):
    return {"train": fashion_tensors()[0]}, {"classes": list(FOLDERS)}


def not_a_pair_of_results(data_dir=None, seed=0):
    return fashion_tensors()[0]


def raises(data_dir=None, seed=0):
    raise FileNotFoundError(f"no data in {data_dir}")


def wrong_std(data_dir=None, seed=0):
    return fashion_tensors()[0], {"classes": list(FOLDERS), "mean": [0.3], "std": [0.0]}


def fixed_size_model(*, in_channels=1, num_classes=10, input_size=28, width=1.0):
    """A model (named by import path) that takes 28x28 images only, whatever it is told."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))
