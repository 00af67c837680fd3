"""Image folders: real Fashion-MNIST test images written as PNG class folders, loaded, streamed and refused."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from toy_datasets import FOLDERS, expected, index_of, source, write_tree

from cloud.build import data, imagefolder
from cloud.build.train import TrainConfig, evaluate, predict_logits, train
from common import datasets, models


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    write_tree(root / "grey", range(300))
    write_tree(root / "colour" / "train", range(200), colour=True)
    write_tree(root / "colour" / "val", range(200, 250), colour=True)
    write_tree(root / "colour" / "test", range(250, 300), colour=True)
    return root


def _paths(split) -> list[str]:
    return [split.source.samples[int(i)][0] for i in split.indices]


def _copy(trees, name, tmp_path):
    shutil.copytree(trees / name, tmp_path / name)
    return tmp_path / name


def test_one_tree_is_split_by_seed_into_disjoint_parts(trees):
    d = data.load("imagefolder", trees / "grey", seed=1, workers=0)
    assert d.info.input_shape == (1, 28, 28) and d.info.classes == tuple(sorted(FOLDERS)) and not d.info.augment
    assert (len(d.train), len(d.val), len(d.test)) == (240, 30, 30)
    parts = [set(_paths(s)) for s in (d.train, d.val, d.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert _paths(data.load("imagefolder", trees / "grey", seed=1).test) == _paths(d.test)
    assert set(_paths(data.load("imagefolder", trees / "grey", seed=2).test)) != parts[2]
    head = datasets.head(d.test, 5)
    assert head.dtype == torch.uint8 and torch.equal(head, torch.stack([expected(p) for p in _paths(d.test)[:5]]))
    labels = {d.train[i][1] for i in range(len(d.train))}
    assert labels == set(range(10))


def test_mean_and_std_are_those_of_the_training_pixels(trees):
    d = data.load("imagefolder", trees / "grey", seed=0)
    pixels = source()[0][[index_of(p) for p in _paths(d.train)]] / 255.0  # all 240 are in the sample
    assert d.info.mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert d.info.std[0] == pytest.approx(pixels.std(), abs=1e-5)


def test_train_val_test_trees_in_colour_and_not_square(trees):
    d = data.load("imagefolder", trees / "colour", seed=0)
    assert d.info.input_shape == (3, 28, 36) and d.info.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (200, 50, 50)
    assert {index_of(p) for p in _paths(d.test)} == set(range(250, 300))
    first = _paths(d.val)[0]
    assert torch.equal(d.val[0][0], expected(first, colour=True))
    rgb = np.stack([expected(p, colour=True).numpy() for p in _paths(d.train)]) / 255.0
    assert d.info.mean == pytest.approx(tuple(rgb.mean(axis=(0, 2, 3))), abs=1e-5)


def test_val_alone_is_also_the_test_split_and_test_alone_gives_val_from_train(trees, tmp_path):
    root = _copy(trees, "colour", tmp_path)
    shutil.rmtree(root / "test")
    d = data.load("imagefolder", root)
    assert d.test is d.val and len(d.val) == 50
    shutil.move(root / "val", root / "test")
    d = data.load("imagefolder", root, val_fraction=0.2)
    assert (len(d.train), len(d.val), len(d.test)) == (160, 40, 50)
    assert not set(_paths(d.val)) & set(_paths(d.train))


def test_input_size_resizes_and_crops_every_image(trees):
    d = data.load("imagefolder", trees / "colour", input_size=(20, 24))
    assert d.info.input_shape == (3, 20, 24)
    x, y = next(datasets.batches(d.test, d.info, 8))
    assert x.shape == (8, 3, 20, 24) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_batches_are_the_same_for_any_number_of_workers(trees, shard):
    d = data.load("imagefolder", trees / "grey")
    info = replace(d.info, augment=True)  # augmentation too must not depend on the workers
    runs = [
        list(datasets.batches(d.train, info, 64, shuffle_seed=5, shard=shard, train=True, workers=w)) for w in (0, 1, 2)
    ]
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for (x0, y0), (x1, y1) in zip(runs[0], other):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    plain = list(datasets.batches(d.train, d.info, 64, shuffle_seed=5, shard=shard))
    assert not torch.equal(plain[0][0], runs[0][0][0])  # it did augment
    assert [len(y) for _, y in runs[0]] == [len(y) for _, y in plain]


def test_a_tiny_model_trains_on_the_streamed_split(trees):
    d = data.load("imagefolder", trees / "grey", workers=2)
    torch.manual_seed(0)
    model = models.build("resnet20", models.zoo_kwargs(d.info.input_shape, 10, 0.25))
    before = [p.detach().clone() for p in model.parameters()]
    train(model, d.info, d.train, TrainConfig(epochs=1, batch_size=32, progress=False), workers=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logits = predict_logits(model, d.info, d.test, batch_size=8)
    labels = torch.tensor([d.test[i][1] for i in range(len(d.test))])
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert evaluate(model, d.info, d.test, batch_size=8) == pytest.approx(accuracy)


def test_mixed_grey_and_colour_images_become_colour(trees, tmp_path, caplog):
    root = _copy(trees, "grey", tmp_path)
    for path in sorted((root / FOLDERS[0]).glob("*.png"))[:3]:
        Image.open(path).convert("RGB").save(path)
    with caplog.at_level(logging.INFO):
        d = data.load("imagefolder", root)
    assert d.info.input_shape == (3, 28, 28) and len(d.info.mean) == 3
    assert "297 grey and 3 colour images" in caplog.text
    assert torch.equal(d.test[0][0][0], d.test[0][0][2])  # a grey image, as RGB


def test_images_of_different_sizes_need_an_input_size(trees, tmp_path):
    root = _copy(trees, "grey", tmp_path)
    path = next((root / FOLDERS[1]).glob("*.png"))
    Image.open(path).resize((30, 30)).save(path)
    with pytest.raises(datasets.DatasetError, match=r"2 sizes .*pass --input-size H,W"):
        data.load("imagefolder", root)
    assert data.load("imagefolder", root, input_size=(28, 28)).info.input_shape == (1, 28, 28)


def test_files_that_are_not_images_are_refused_by_name(trees, tmp_path):
    root = _copy(trees, "grey", tmp_path)
    for i in range(7):
        (root / FOLDERS[2] / f"notes{i}.png").write_text("not a picture")
    with pytest.raises(datasets.DatasetError, match=r"7 of 307 files are not images") as err:
        data.load("imagefolder", root)
    assert f"{FOLDERS[2]}/notes0.png (not an image Pillow can read)" in str(err.value)
    assert "and 2 more" in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_fails_to_decode_in_a_worker_is_named(trees, tmp_path, workers):
    root = _copy(trees, "colour", tmp_path)
    path = next((root / "test" / FOLDERS[3]).glob("*.png"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-3000])  # the header is intact: only decoding finds out
    d = data.load("imagefolder", root, input_size=(28, 36), workers=workers)
    with pytest.raises(datasets.DatasetError, match=rf"{path.name}.*cannot decode"):
        list(datasets.batches(d.test, d.info, 16))


def test_bad_folders_are_refused(trees, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetError, match="has no class folders"):
        data.load("imagefolder", tmp_path / "empty")
    with pytest.raises(datasets.DatasetError, match="is not a directory"):
        data.load("imagefolder", tmp_path / "missing")
    single = tmp_path / "single"
    shutil.copytree(trees / "grey" / FOLDERS[0], single / FOLDERS[0])
    with pytest.raises(datasets.DatasetError, match=rf"1 class\(es\) \['{FOLDERS[0]}'\]; a classifier needs at least"):
        data.load("imagefolder", single)
    (single / "Bag").mkdir()
    with pytest.raises(datasets.DatasetError, match="class folder.s. Bag hold no PNG or JPEG files"):
        data.load("imagefolder", single)


def test_splits_with_other_classes_are_refused_by_name(trees, tmp_path):
    root = _copy(trees, "colour", tmp_path)
    shutil.rmtree(root / "val" / FOLDERS[4])
    (root / "val" / "Hat").mkdir()
    with pytest.raises(datasets.DatasetError, match=rf"val/ has other class folders .*missing: {FOLDERS[4]}.*Hat"):
        data.load("imagefolder", root)
    shutil.rmtree(root / "val")
    shutil.rmtree(root / "test")
    with pytest.raises(datasets.DatasetError, match="train/ but neither val/ nor test/"):
        data.load("imagefolder", root)


def test_only_png_and_jpeg_files_are_images():
    assert imagefolder.is_image_file("a/b.PNG") and imagefolder.is_image_file("x.jpeg")
    assert not imagefolder.is_image_file("notes.txt") and not imagefolder.is_image_file("a.gif")
