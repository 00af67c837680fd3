"""CIFAR-10 from its binary distribution, its augmentation, and data-parallel shards."""

import numpy as np
import pytest
import torch

from common import datasets
from common.datasets import DatasetError


def _write_cifar(root, per_file: int = 20, seed: int = 0):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.zeros((per_file, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, per_file)
        records[:, 1:] = rng.integers(0, 256, (per_file, 3072))
        (folder / name).write_bytes(records.tobytes())
    return folder


def test_cifar10_loads_records_as_channel_planes(tmp_path):
    folder = _write_cifar(tmp_path)
    data = datasets.load("cifar10", tmp_path, val_fraction=0.1)
    assert data.info.input_shape == (3, 32, 32) and data.info.augment
    assert len(data.train) + len(data.val) == 100 and len(data.test) == 20
    raw = np.frombuffer((folder / "test_batch.bin").read_bytes(), dtype=np.uint8).reshape(20, 3073)
    assert int(data.test.labels[3]) == raw[3, 0]
    assert torch.equal(data.test.images[3, 1, 0], torch.from_numpy(raw[3, 1 + 1024 : 1 + 1024 + 32].copy()))


def test_a_truncated_cifar_file_is_refused_with_its_name(tmp_path):
    folder = _write_cifar(tmp_path)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="data_batch_3.bin.*not a whole number"):
        datasets.load("cifar10", folder)


def test_cifar10_without_a_directory_says_how_to_get_it():
    with pytest.raises(DatasetError, match="cifar-10-batches-bin"):
        datasets.load("cifar10", None)


def test_augmentation_crops_and_flips_and_keeps_pixels():
    images = torch.randint(1, 255, (64, 3, 32, 32), dtype=torch.uint8)
    out = datasets.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)  # 64 images: some crop moved or some flip happened
    for original, moved in zip(images, out):  # every kept pixel comes from the image or the zero padding
        kept = moved[moved != 0]
        assert torch.isin(kept, original.flatten()).all()


def test_shards_cover_every_example_once_per_epoch_and_batches_split():
    split = datasets.Split(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    info = datasets.FASHION_MNIST
    seen = [torch.cat([y for _, y in datasets.batches(split, info, 4, shuffle_seed=3, shard=(r, 2))]) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 5
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    assert [len(y) for _, y in datasets.batches(split, info, 4, shuffle_seed=3, shard=(0, 2))] == [2, 2, 1]
    with pytest.raises(ValueError, match="does not split over 3"):
        next(datasets.batches(split, info, 4, shard=(0, 3)))
