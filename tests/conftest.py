"""Shared fixtures: real Fashion-MNIST and one small real portfolio per session (helpers: `helpers.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common import datasets


@pytest.fixture(scope="session")
def fashion_mnist() -> datasets.Dataset:
    try:
        return datasets.load("fashion-mnist")
    except datasets.DatasetError as err:
        pytest.fail(f"Fashion-MNIST is required: {err}")


@pytest.fixture(scope="session")
def small_portfolio(tmp_path_factory) -> Path:
    """A real shifter portfolio: vgg11 at width 1/8 trained briefly on 2000 Fashion-MNIST images."""
    from cloud.build import portfolio
    from cloud.build.methods import shifter
    from cloud.build.train import TrainConfig

    out = tmp_path_factory.mktemp("portfolio")
    torch.manual_seed(0)
    portfolio.build(
        portfolio.BuildConfig(
            out=out,
            model="vgg11",
            width=0.125,
            subset=2000,
            test_subset=2000,
            check_images=64,
            train=TrainConfig(epochs=1, batch_size=64, progress=False),
            method="shifter",
            method_settings=shifter.ShifterConfig(levels=3, rate=0.85),
        )
    )
    return out
