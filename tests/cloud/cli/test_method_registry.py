"""A pruning method is one module and one registry entry: registered, the test's `toy` method gets its
own `portfolio build` flags and builds a real portfolio through the CLI. The generated flags (the
names users type today among them) round-trip into the settings dataclasses, a flag of another method
is refused by name, and two methods claiming one flag stop the parser from being built."""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import toy_method

from cloud.build.config import BuildConfig
from cloud.build.methods import METHODS, reconvene, shifter
from cloud.build.methods.base import Method
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, evaluate
from cloud.cli import build_command
from cloud.cli.main import main
from common import datasets, models, variant


def _parse(argv: list[str]) -> BuildConfig:
    parser = argparse.ArgumentParser(prog="portfolio")
    build_command.add_parser(parser.add_subparsers(dest="action"))
    return build_command.config_from_arguments(parser.parse_args(["build", *argv]))


def test_a_registered_method_builds_a_portfolio_through_the_cli(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setitem(METHODS, "toy", toy_method.METHOD)
    out = tmp_path / "toy"
    argv = ["portfolio", "build", "--method", "toy", "--toy-compressions", "2,4", "--subset", "500", "--epochs", "1"]
    argv += ["--model", "vgg11", "--width", "0.125", "--batch-size", "64", "--check-images", "32", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    manifest = PortfolioStore(out).manifest()
    assert manifest.method == "toy" and [v.name for v in manifest.variants] == ["toy-2x", "toy-4x"]
    assert all(v.method == "toy" for v in manifest.variants)
    assert [round(v.compression, 2) for v in manifest.variants] == [2.0, 4.0]
    settings = json.loads((out / "work" / "settings.json").read_text())
    assert settings["method"] == "toy" and settings["method_settings"] == {"toy_compressions": [2.0, 4.0]}
    dense = models.build("vgg11", models.zoo_kwargs((1, 28, 28), 10, 0.125))
    dense.load_state_dict(torch.load(out / "work" / toy_method.DENSE_CHECKPOINT, weights_only=True)["model"])
    info = fashion_mnist.info
    images = datasets.normalize(fashion_mnist.test.images[:64], info.mean, info.std)
    # the toy's levels are all pruned: the build trained the dense model from the same seed with the same
    # recipe to compare with, the very model the toy trained and pruned
    assert manifest.dense.trained_by_build and manifest.dense.epochs == 1
    assert manifest.dense.accuracy == evaluate(dense, fashion_mnist.info, fashion_mnist.test)
    for entry in manifest.variants:
        loaded = variant.load(PortfolioStore(out).variant_path(entry.variant_id), entry.variant_id)
        assert loaded.spec.method == "toy" and models.count_params(loaded.model) == entry.params
        sparse, _ = toy_method.pruned(dense, entry.compression, images[:1])  # what the method handed over
        with torch.no_grad():
            served, expected = loaded.model.eval()(images), sparse(images)
        assert torch.allclose(served, expected, atol=1e-4) and torch.equal(served.argmax(1), expected.argmax(1))


def test_the_flags_users_type_round_trip_into_the_settings():
    common = ["--out", "p", "--model", "resnet20", "--width", "0.5", "--dataset", "cifar10", "--data-dir", "d"]
    common += ["--subset", "100", "--threads", "3", "--seed", "7", "--targets", "1,4", "--epochs", "3"]
    common += ["--batch-size", "32", "--lr", "0.1", "--momentum", "0.8", "--weight-decay", "0.001"]
    common += ["--milestones", "0.3,0.6", "--gamma", "0.2"]
    recipe = {"epochs": 3, "batch_size": 32, "lr": 0.1, "momentum": 0.8, "weight_decay": 0.001, "gamma": 0.2}
    train = TrainConfig(milestones=(0.3, 0.6), seed=7, **recipe)  # the build's --seed orders the data too
    expected = {
        "out": Path("p"),
        "model": "resnet20",
        "width": 0.5,
        "dataset": "cifar10",
        "data_dir": Path("d"),
        "subset": 100,
        "threads": 3,
        "seed": 7,
        "targets": (1.0, 4.0),
        "train": train,
    }
    shifter_flags = ["--levels", "5", "--rate", "0.5", "--rewind-iteration", "20", "--ignore", "features.0,classifier"]
    assert _parse([*common, "--method", "shifter", *shifter_flags]) == BuildConfig(
        method="shifter",
        method_settings=shifter.ShifterConfig(5, 0.5, 20, ("features.0", "classifier")),
        **expected,
    )
    reconvene_flags = ["--scorer", "snip", "--compressions", "2,8", "--sensitivity-threshold", "0.1"]
    reconvene_flags += ["--sensitivity-coverage", "0.5", "--synflow-rounds", "10", "--score-batches", "2"]
    assert _parse([*common, "--method", "reconvene", *reconvene_flags]) == BuildConfig(
        method="reconvene",
        method_settings=reconvene.ReconveneConfig("snip", (2.0, 8.0), 0.1, 0.5, 10, score_batches=2),
        **expected,
    )
    assert _parse(["--out", "p"]) == BuildConfig(out=Path("p"))  # nothing given: every default


def test_a_registered_method_brings_its_flags(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", toy_method.METHOD)
    config = _parse(["--out", "p", "--method", "toy", "--toy-compressions", "3,9"])
    assert config.method_settings == toy_method.ToySettings(toy_compressions=(3.0, 9.0))
    assert _parse(["--out", "p", "--method", "toy"]).method_settings == toy_method.ToySettings()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--method", "reconvene", "--levels", "2"],
            "--levels is a setting of method 'shifter', not of --method reconvene",
        ),
        (
            ["--scorer", "snip", "--synflow-rounds", "3"],
            "--scorer, --synflow-rounds are settings of method 'reconvene'",
        ),
        (["--toy-compressions", "2"], "--toy-compressions is a setting of method 'toy', not of --method shifter"),
    ],
)
def test_a_flag_of_another_method_is_refused_by_name(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setitem(METHODS, "toy", toy_method.METHOD)
    assert main(["portfolio", "build", "--out", str(tmp_path / "p"), *argv]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@dataclass(frozen=True)
class _ClashingSettings:
    rate: float = field(default=0.5, metadata={"help": "the same flag as shifter's --rate"})


def test_two_methods_claiming_one_flag_stop_the_parser(monkeypatch):
    clash = Method("clash", "a method whose flag is taken", _ClashingSettings, toy_method.levels, lambda s: [1.0])
    monkeypatch.setitem(METHODS, "clash", clash)
    with pytest.raises(SettingsError, match="flag --rate of method 'clash' clashes with --rate of method 'shifter'"):
        _parse(["--out", "p"])


def test_method_settings_of_another_method_are_refused():
    with pytest.raises(SettingsError, match="method 'reconvene' takes ReconveneConfig settings, got ShifterConfig"):
        BuildConfig(out=Path("p"), method="reconvene", method_settings=shifter.ShifterConfig())
