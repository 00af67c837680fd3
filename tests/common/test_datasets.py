import gzip
import struct
from dataclasses import replace

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


def _reference_batches(split, info, batch_size, seed, rank, world, augment):
    """The batches as they have always been made, step by step from the uint8 tensors: one seeded
    shuffle, every world-th example (padded by wrapping), and, when augmenting, one generator seeded
    by seed * 7919 + rank drawing each batch's vertical and horizontal offsets and flips in turn."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = torch.cat([order, order[: (-n) % world]])[rank::world]
    size = batch_size // world
    generator = torch.Generator().manual_seed(seed * 7919 + rank)
    mean, std = info.mean[0], info.std[0]
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        images = split.images[idx]
        if augment:
            dy = torch.randint(0, 9, (len(idx),), generator=generator)
            dx = torch.randint(0, 9, (len(idx),), generator=generator)
            flip = torch.rand(len(idx), generator=generator) < 0.5
            padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
            crops = [padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(len(idx))]
            images = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip)])
        yield (images.float() / 255 - mean) / std, split.labels[idx]


@pytest.mark.parametrize("shard", [(0, 1), (1, 3)])
@pytest.mark.parametrize("augment", [False, True])
def test_in_memory_batches_are_as_they_always_were(fashion_mnist, shard, augment):
    split = fashion_mnist.train.subset(500, seed=2)
    info = replace(fashion_mnist.info, augment=augment)
    got = list(datasets.batches(split, info, 96, shuffle_seed=11, shard=shard, train=True, workers=2))
    want = list(_reference_batches(split, info, 96, 11, *shard, augment))
    assert len(got) == len(want) == -(-(500 + (-500) % shard[1]) // shard[1] // (96 // shard[1]))
    for (x, y), (rx, ry) in zip(got, want):
        assert torch.allclose(x, rx, atol=1e-6) and torch.equal(y, ry)


def test_head_takes_the_first_examples_of_an_in_memory_split(fashion_mnist):
    assert torch.equal(datasets.head(fashion_mnist.test, 5), fashion_mnist.test.images[:5])


class _Squares(torch.utils.data.Dataset):
    """Item i: a 1x2x2 uint8 image of value i, label i % 3."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.full((1, 2, 2), i, dtype=torch.uint8), i % 3


def test_a_streamed_split_subsets_and_heads_like_an_in_memory_one():
    stream = datasets.StreamSplit(_Squares(), torch.arange(10, 50))
    items = [stream[i] for i in range(40)]
    memory = datasets.Split(torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]))
    assert len(stream) == 40 and int(items[0][0].flatten()[0]) == 10 and items[0][1] == 1
    assert torch.equal(datasets.head(stream.subset(7, seed=4), 7), memory.subset(7, seed=4).images)
    assert stream.subset(0, seed=1) is stream and len(stream.subset(100, seed=1)) == 40
    with pytest.raises(ValueError, match="1-D int64"):
        datasets.StreamSplit(_Squares(), torch.arange(5).float())


def test_channel_stats_match_the_pixels_whatever_the_workers():
    stream = datasets.StreamSplit(_Squares(), torch.arange(50))
    values = torch.arange(50, dtype=torch.float64) / 255
    for workers in (0, 2):
        mean, std = datasets.channel_stats(stream, count=1000, seed=0, workers=workers)
        assert mean[0] == pytest.approx(float(values.mean()), abs=1e-6)
        assert std[0] == pytest.approx(float(values.std(unbiased=False)), abs=1e-6)
    assert datasets.channel_stats(stream, count=10, seed=1) == datasets.channel_stats(stream, count=10, seed=1)


def test_seeded_parts_are_disjoint_and_cover_everything():
    train, val, test = datasets.seeded_parts(100, 0.1, seed=3, with_test=True)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="val_fraction"):
        datasets.seeded_parts(100, 0.5, seed=3, with_test=True)
