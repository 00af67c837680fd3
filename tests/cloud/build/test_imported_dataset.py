"""Datasets named by import path (defined in tests/toy_datasets.py): the contract, the allow-list, refusals."""

from __future__ import annotations

import pytest
import torch
from toy_datasets import COUNT, FOLDERS, coloured, source

from cloud.build import data, imported
from common import datasets
from common.registry import ImportPathError


def test_one_dataset_of_tensors_is_split_by_seed():
    d = data.load("toy_datasets:fashion_tensors", None, seed=4, workers=0)
    assert d.info.name == "toy_datasets:fashion_tensors" and d.info.classes == FOLDERS
    assert d.info.input_shape == (1, 28, 28) and not d.info.augment
    assert (len(d.train), len(d.val), len(d.test)) == (240, 30, 30)
    seen = torch.cat([d.train.indices, d.val.indices, d.test.indices])
    assert sorted(seen.tolist()) == list(range(COUNT))
    images, labels = source()
    first = int(d.test.indices[0])
    assert torch.equal(datasets.head(d.test, 1)[0, 0], torch.from_numpy(images[first]))
    assert d.test[0][1] == labels[first]
    pixels = images[d.train.indices.numpy()] / 255.0
    assert d.info.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert d.info.std[0] == pytest.approx(pixels.std(), abs=1e-5)


def test_train_and_test_parts_of_pil_images_with_stated_statistics():
    d = data.load("toy_datasets:fashion_pictures", None, seed=0, workers=1)
    assert d.info.input_shape == (3, 28, 36) and d.info.mean == (0.3, 0.2, 0.6) and d.info.std == (0.3, 0.2, 0.3)
    assert (len(d.train), len(d.val), len(d.test)) == (225, 25, 50)
    assert not set(d.train.indices.tolist()) & set(d.val.indices.tolist())
    images, _ = source()
    first = 250 + int(d.test.indices[0])
    assert torch.equal(d.test[0][0], torch.from_numpy(coloured(images[first]).transpose(2, 0, 1).copy()))
    runs = [list(datasets.batches(d.test, d.info, 16, workers=w)) for w in (0, 2)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs))


def test_pil_images_are_resized_to_the_input_size():
    d = data.load("toy_datasets:fashion_pictures", None, input_size=(16, 16))
    assert d.info.input_shape == (3, 16, 16) and datasets.head(d.train, 3).shape == (3, 3, 16, 16)


def test_a_path_not_allowed_is_refused_before_importing():
    with pytest.raises(imported.DatasetNotAllowedError, match="'toy_datasets:fashion_tensors' is not allowed here"):
        data.load("toy_datasets:fashion_tensors", None, allowed=("toy_datasets:fashion_pictures",))
    with pytest.raises(imported.DatasetNotAllowedError, match="allowed: none"):
        imported.load("no_such_module_anywhere:data")
    with pytest.raises(ImportPathError, match="malformed import path"):
        data.load("toy_datasets:", None)
    with pytest.raises(ImportPathError, match="no module named 'no_such_module_anywhere'"):
        data.load("no_such_module_anywhere:data", None)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("not_a_pair_of_results", r"must return \(data, info\), got _Pairs"),
        ("only_train", r"a dict of 'train', 'test' \(and 'val'\) Datasets, got \['train'\]"),
        ("no_classes", r"info must be a dict with 'classes' \(and 'mean', 'std'\), got \['names'\]"),
        ("no_pair", r"item \d+ is Tensor, not an \(image, label\) pair"),
        ("float_images", r"holds a torch.float32 tensor of shape \(1, 28, 28\); images must be uint8"),
        ("label_out_of_range", r"has label 2, not a class index in 0..1"),
        ("raises", r"failed: FileNotFoundError: no data in None"),
        ("wrong_std", r"info\['std'\] must be positive"),
        ("COUNT", r"is not callable"),
    ],
)
def test_datasets_that_break_the_contract_are_refused_by_name(function, message):
    path = f"toy_datasets:{function}"
    with pytest.raises(datasets.DatasetError, match=message) as err:
        data.load(path, None)
    assert path in str(err.value)


def test_input_size_with_tensor_images_of_another_size_is_refused():
    with pytest.raises(datasets.DatasetError, match="resizes PIL images only"):
        data.load("toy_datasets:fashion_tensors", None, input_size=(32, 32))
