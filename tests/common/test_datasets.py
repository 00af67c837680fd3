import gzip
import struct

import numpy as np
import pytest
import torch

from common import datasets


def _write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def _fake_dir(tmp_path, n_train=50, n_test=20, compress=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 28, 28)), compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), compress)
    return tmp_path


def test_real_fashion_mnist_has_the_published_sizes(fashion_mnist):
    assert len(fashion_mnist.train) + len(fashion_mnist.val) == 60000
    assert len(fashion_mnist.test) == 10000
    assert fashion_mnist.train.images.shape[1:] == (1, 28, 28)
    assert fashion_mnist.train.images.dtype == torch.uint8
    assert set(fashion_mnist.test.labels.unique().tolist()) == set(range(10))


def test_split_and_subset_are_deterministic_and_disjoint(tmp_path):
    d = _fake_dir(tmp_path, compress=True)
    a = datasets.load("fashion-mnist", d, val_fraction=0.2, seed=3)
    b = datasets.load("fashion-mnist", d, val_fraction=0.2, seed=3)
    c = datasets.load("fashion-mnist", d, val_fraction=0.2, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert len(a.train) == 40 and len(a.val) == 10
    train_rows = {bytes(x.numpy()) for x in a.train.images}
    assert not train_rows & {bytes(x.numpy()) for x in a.val.images}
    assert torch.equal(a.train.subset(7, seed=1).images, b.train.subset(7, seed=1).images)
    assert len(a.train.subset(7, seed=1)) == 7


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(datasets.DatasetError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion-mnist", tmp_path)


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    d = _fake_dir(tmp_path)
    path = d / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(datasets.DatasetError, match="corrupt or truncated"):
        datasets.load("fashion-mnist", d)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(KeyError, match="known: cifar10, fashion-mnist"):
        datasets.load("imagenet")


def test_batches_normalize_with_the_dataset_statistics(tmp_path):
    data = datasets.load("fashion-mnist", _fake_dir(tmp_path))
    x, y = next(datasets.batches(data.test, data.info, 8))
    expected = (data.test.images[:8].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x, expected) and torch.equal(y, data.test.labels[:8])
