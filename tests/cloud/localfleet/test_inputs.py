"""The portfolio's own inputs: its dataset's test images, or random pixels of its shape (logged)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from edge_helpers import FakeCloud, portfolio_of
from helpers import variant_store

from cloud.localfleet import inputs
from common import models, variant
from common.security import Transport
from protos import portfolio_pb2


class ListingCloud(FakeCloud):
    def ListVariants(self, request, context):
        return portfolio_pb2.ListVariantsResponse(variants=self.infos, portfolio_id="p1")


def _with_settings(store, **settings):
    store.write_manifest(replace(store.manifest(), settings=settings))
    return store


def test_a_fashion_mnist_portfolio_gets_the_fashion_mnist_test_images(tmp_path, fashion_mnist):
    store = _with_settings(variant_store(tmp_path / "p", widths=(0.125,)), dataset="fashion-mnist", data_dir=None)
    images = inputs.portfolio_inputs(store.root, 16)
    assert images.dtype == np.uint8 and images.shape == (16, 1, 28, 28)
    assert np.array_equal(images, fashion_mnist.test.images[:16].numpy())


def test_data_missing_here_gives_seeded_random_inputs_of_the_portfolio_shape_and_says_so(tmp_path, caplog):
    absent = tmp_path / "not-here"
    store = _with_settings(
        variant_store(tmp_path / "p", widths=(0.125,)), dataset="fashion-mnist", data_dir=str(absent)
    )
    with caplog.at_level(logging.WARNING, logger="cloud.localfleet.inputs"):
        images = inputs.portfolio_inputs(store, 8, seed=3)
    assert images.dtype == np.uint8 and images.shape == (8, 1, 28, 28)
    assert np.array_equal(images, inputs.portfolio_inputs(store, 8, seed=3))
    assert images.std() > 0  # not a constant stand-in
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "not on this host" in warning and "random" in warning and "1x28x28" in warning


def test_data_of_another_shape_than_the_variants_is_refused(tmp_path):
    store = variant_store(tmp_path / "p", widths=(0.125,))
    with pytest.raises(inputs.InputsError, match=r"\(3, 32, 32\)"):
        inputs.inputs_for((3, 32, 32), {"dataset": "fashion-mnist"}, 4)
    assert inputs.input_shape(store) == (1, 28, 28)


def test_the_spec_is_read_from_a_header_prefix_only_once_it_is_whole(tmp_path):
    kwargs = {"in_channels": 3, "input_size": 32, "num_classes": 10, "width": 0.125}
    spec = variant.VariantSpec("vgg11", kwargs, (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, "dense", 0.0, 0.5)
    data = variant.encode(models.build("vgg11", kwargs), spec)
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert inputs.spec_from_prefix(data[:5]) is None
    assert inputs.spec_from_prefix(data[: header_end - 1]) is None
    assert inputs.spec_from_prefix(data[:header_end]).input_shape == (3, 32, 32)
    prefix, chunks = b"", 0  # as FetchVariant's chunks arrive
    while inputs.spec_from_prefix(prefix) is None:
        prefix, chunks = prefix + data[chunks * 1000 : (chunks + 1) * 1000], chunks + 1
    assert chunks == -(-header_end // 1000) and inputs.spec_from_prefix(prefix) == spec


def test_a_load_generator_without_a_store_takes_the_served_shape(tmp_path, caplog):
    files, infos = portfolio_of(tmp_path, [("big", 0.25, 0.9), ("small", 0.125, 0.8)])
    cloud = ListingCloud(files, infos)
    address = cloud.start()
    try:
        assert inputs.served_input_shape(address, Transport.plaintext()) == (1, 28, 28)
        with caplog.at_level(logging.WARNING, logger="cloud.localfleet.inputs"):
            images = inputs.served_inputs(address, Transport.plaintext(), 5)
    finally:
        cloud.stop()
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.uint8
    assert any("random" in r.getMessage() for r in caplog.records)
