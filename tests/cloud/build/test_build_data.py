"""The build's data settings: names, --input-size, --workers, the model check, and a build on an image folder."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from toy_datasets import FOLDERS, write_tree

from cloud.build import data, portfolio
from cloud.build.methods import shifter
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig
from common import datasets, models, variant
from common.registry import ImportPathError, UnknownNameError

QUICK = TrainConfig(epochs=1, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def grey_tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("grey"), range(300))


def test_dataset_names_and_input_sizes_are_checked_before_anything_is_read(tmp_path):
    data.check("imagefolder", tmp_path, (20, 30))
    data.check("fashion-mnist", None, (28, 28))
    data.check("mypkg.data:faces", None, (64, 64))
    with pytest.raises(UnknownNameError, match="known: cifar10, fashion-mnist, imagefolder, or package.module:func"):
        data.check("imagenet")
    with pytest.raises(ImportPathError, match="malformed import path"):
        data.check("my-pkg:faces")
    with pytest.raises(SettingsError, match="needs --data-dir"):
        data.check("imagefolder")
    with pytest.raises(SettingsError, match=r"fashion-mnist is used at its own size \(28,28\)"):
        data.check("fashion-mnist", None, (32, 32))
    with pytest.raises(SettingsError, match="--input-size takes H,W"):
        data.check("imagefolder", tmp_path, (32,))
    with pytest.raises(SettingsError, match="--input-size takes H,W"):
        data.check("imagefolder", tmp_path, (0, 32))


def test_build_config_carries_what_loads_the_same_data_but_not_the_workers(tmp_path, grey_tree):
    folder = {"dataset": "imagefolder", "data_dir": grey_tree, "input_size": (28, 28)}
    settings = portfolio.BuildConfig(out=tmp_path, workers=3, **folder).settings()
    assert settings["dataset"] == "imagefolder" and settings["data_dir"] == str(grey_tree)
    assert settings["input_size"] == [28, 28] and "workers" not in settings
    assert settings == portfolio.BuildConfig(out=tmp_path, workers=0, **folder).settings()
    with pytest.raises(SettingsError, match="needs --data-dir"):
        portfolio.BuildConfig(out=tmp_path, dataset="imagefolder")
    with pytest.raises(SettingsError, match="workers must be >= 0"):
        portfolio.BuildConfig(out=tmp_path, workers=-1)
    with pytest.raises(SettingsError, match="used at its own size"):
        portfolio.BuildConfig(out=tmp_path, input_size=(32, 32))


def test_a_test_subset_is_a_seeded_subset_of_the_test_split_and_zero_is_all_of_it(tmp_path, fashion_mnist):
    whole = data.for_build(portfolio.BuildConfig(out=tmp_path))
    assert len(whole.test) == len(fashion_mnist.test) == 10_000
    cut = data.for_build(portfolio.BuildConfig(out=tmp_path, test_subset=500, seed=3))
    assert len(cut.test) == 500 and len(cut.train) == len(whole.train)  # the training split as it was
    again = data.for_build(portfolio.BuildConfig(out=tmp_path, test_subset=500, seed=3))
    assert torch.equal(cut.test.images, again.test.images) and torch.equal(cut.test.labels, again.test.labels)
    assert portfolio.BuildConfig(out=tmp_path, test_subset=500).settings()["test_subset"] == 500  # in the manifest
    with pytest.raises(SettingsError, match="test_subset"):
        portfolio.BuildConfig(out=tmp_path, test_subset=-1)


def test_an_input_size_the_model_cannot_take_is_refused_naming_model_shape_and_why():
    info = datasets.DatasetInfo("imagefolder", (3, 28, 36), 10, (0.5,) * 3, (0.25,) * 3)
    kwargs = models.zoo_kwargs(info.input_shape, 10, 0.125)
    fixed = "toy_datasets:fixed_size_model"
    state = torch.random.get_rng_state()
    with pytest.raises(
        SettingsError,
        match=r"model 'toy_datasets:fixed_size_model' cannot take inputs of shape "
        r"\(3, 28, 36\) \(C, H, W\) from imagefolder: RuntimeError: mat1 and mat2 shapes",
    ):
        data.check_model_input(fixed, lambda: models.build(fixed, kwargs, allowed=(fixed,)), info)
    assert torch.equal(state, torch.random.get_rng_state())  # the build's initialization is not disturbed
    data.check_model_input("resnet20", lambda: models.build("resnet20", kwargs), info)
    with pytest.raises(SettingsError, match=r"gives \(1, 10\) for one input of \(3, 28, 36\), not \(1, 7\)"):
        data.check_model_input("resnet20", lambda: models.build("resnet20", kwargs), replace(info, num_classes=7))


def test_a_portfolio_built_on_an_image_folder_carries_its_classes_and_statistics(tmp_path, grey_tree):
    config = portfolio.BuildConfig(
        out=tmp_path / "store",
        model="vgg11",
        width=0.125,
        dataset="imagefolder",
        data_dir=grey_tree,
        subset=64,
        check_images=16,
        workers=1,
        train=QUICK,
        method="shifter",
        method_settings=shifter.ShifterConfig(levels=1, rate=0.5),
    )
    torch.manual_seed(0)
    manifest = portfolio.build(config)
    loaded = data.load("imagefolder", grey_tree)
    store = PortfolioStore(tmp_path / "store")
    assert manifest.dataset == "imagefolder" and manifest.settings["data_dir"] == str(grey_tree)
    assert len(manifest.variants) == 2
    for entry in manifest.variants:
        spec = variant.load(store.variant_path(entry.variant_id)).spec
        assert spec.classes == tuple(sorted(FOLDERS)) and spec.input_shape == (1, 28, 28)
        assert spec.mean == loaded.info.mean and spec.std == loaded.info.std
        assert 0.0 <= spec.accuracy <= 1.0


def test_a_build_refuses_an_input_the_model_cannot_take_before_training(tmp_path):
    colour = write_tree(tmp_path / "colour", range(100), colour=True)
    fixed = "toy_datasets:fixed_size_model"
    config = portfolio.BuildConfig(out=tmp_path / "s", model=fixed, dataset="imagefolder", data_dir=colour, train=QUICK)
    with pytest.raises(SettingsError, match=rf"'{fixed}' cannot take inputs of shape \(3, 28, 36\)"):
        portfolio.build(config)
    assert not list((tmp_path / "s").glob("work/*.pt"))
