"""Every portfolio is compared with its dense model, and a model a method made compact itself is stored
as it was trained: its variant file must rebuild it exactly, or the build refuses it by name. The
build runs for real on Fashion-MNIST with `narrow` (tests/narrow_method.py), whose levels are the
architecture at narrower widths."""

import dataclasses

import narrow_method
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cloud.build import derive, portfolio, reference
from cloud.build.methods import METHODS
from cloud.build.methods.base import BuildContext, MethodError, SparseModel
from cloud.build.settings import SettingsError
from cloud.build.store import PortfolioStore
from cloud.build.train import TrainConfig, evaluate, load_state
from common import datasets, models, variant
from common.profiling import count_macs

QUICK = TrainConfig(epochs=1, batch_size=64, progress=False)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a build sets the process's threads


@pytest.fixture
def small_data(fashion_mnist) -> datasets.Dataset:
    """Fashion-MNIST cut to 256 training and 1000 test images."""
    data = fashion_mnist
    return datasets.Dataset(data.info, data.train.subset(256, 0), data.val, data.test.subset(1000, 0))


def _trained(context: BuildContext, level: int, fraction: float) -> nn.Module:
    model = narrow_method.narrowed(context, fraction)
    model.load_state_dict(load_state(context.work_dir / narrow_method.checkpoint(level))["model"])
    return model.eval()


def test_compact_models_are_stored_as_trained_and_compared_with_the_dense_level(
    tmp_path, monkeypatch, fashion_mnist, one_thread
):
    monkeypatch.setitem(METHODS, "narrow", narrow_method.METHOD)
    config = portfolio.BuildConfig(
        out=tmp_path / "p",
        method="narrow",
        model="vgg11",
        width=0.125,
        subset=256,
        threads=1,
        check_images=32,
        targets=(4.0,),  # level 0, the dense model, is left out of the portfolio
        train=QUICK,
        method_settings=narrow_method.NarrowSettings((0.5,)),
    )
    manifest = portfolio.build(config)
    (entry,), dense = manifest.variants, manifest.dense
    assert entry.name == "narrow-0.5" and entry.level == 1
    assert (dense.level, dense.source, dense.trained_by_build, dense.epochs) == (0, "level 0 of narrow", False, 0)
    context = BuildContext(config, fashion_mnist, PortfolioStore(config.out))
    full, narrow = _trained(context, 0, 1.0), _trained(context, 1, 0.5)
    assert dense.params == models.count_params(full) and dense.macs == count_macs(full, (1, 28, 28))
    assert dense.accuracy == evaluate(full, fashion_mnist.info, fashion_mnist.test)
    # the variant is the trained narrow model itself: its file rebuilds it exactly
    loaded = variant.load(context.store.variant_path(entry.variant_id), entry.variant_id).model
    images = datasets.normalize(fashion_mnist.test.images[:64], fashion_mnist.info.mean, fashion_mnist.info.std)
    with torch.no_grad():
        assert torch.equal(loaded(images), narrow(images))
    assert entry.max_abs_diff <= derive.REBUILD_ATOL and entry.accuracy == entry.sparse_accuracy
    assert entry.accuracy == evaluate(narrow, fashion_mnist.info, fashion_mnist.test)
    assert entry.params == entry.sparse_params == models.count_params(narrow) < dense.params
    assert entry.compression == pytest.approx(narrow_method.weights(full) / narrow_method.weights(narrow))
    assert entry.sparsity == pytest.approx(1 - 1 / entry.compression)
    # against the dense model, timed in the same rounds
    assert entry.acc_delta_pp == pytest.approx(100 * (entry.accuracy - dense.accuracy))
    assert entry.speedup_b1 == dense.latency_ms_b1 / entry.latency_ms_b1
    assert entry.speedup_b32 == dense.latency_ms_b32 / entry.latency_ms_b32
    assert entry.macs_ratio == dense.macs / entry.macs > 1
    assert dense.latency_ms_b1_q1 <= dense.latency_ms_b1 <= dense.latency_ms_b1_q3
    assert dense.latency_ms_b32_q1 <= dense.latency_ms_b32 <= dense.latency_ms_b32_q3
    assert PortfolioStore(config.out).manifest() == manifest  # the dense model round-trips through the file
    stored = variant.load(context.store.variant_path(dense.variant_id), dense.variant_id).model  # to time it again
    with torch.no_grad():
        assert torch.equal(stored(images), full(images))


def _activation_changed(model: nn.Module) -> nn.Module:
    index = next(i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU))
    model.features[index] = nn.Tanh()  # no tensor says so: the file rebuilds a ReLU
    return model


def _layer_added(model: nn.Module) -> nn.Module:
    model.extra = nn.Linear(2, 2)  # a tensor the architecture has no place for
    return model


@pytest.mark.parametrize(
    ("change", "needle"),
    [(_activation_changed, "differs from the trained model by"), (_layer_added, "does not rebuild it")],
)
def test_a_compact_model_its_file_does_not_rebuild_is_refused_by_name(tmp_path, small_data, change, needle):
    config = portfolio.BuildConfig(out=tmp_path, model="vgg11", width=0.125, check_images=16)
    context = BuildContext(config, small_data, PortfolioStore(tmp_path))
    torch.manual_seed(0)
    sparse = SparseModel(1, change(context.new_model()).eval(), {}, compression=2.0, name="doctored", compact=True)
    with pytest.raises(derive.CompactModelError, match=f"compact model doctored: .*{needle}"):
        derive.derive_variant(sparse, context, dense_params=1)
    assert not (tmp_path / "variants").exists()  # nothing stored


def test_a_compact_model_needs_its_compression_and_no_masks():
    model = nn.Linear(2, 2)
    with pytest.raises(MethodError, match="compact model level 3 must come with its compression"):
        SparseModel(3, model, {}, compact=True)
    with pytest.raises(MethodError, match="compact model small"):
        SparseModel(3, model, {"weight": torch.ones(2, 2)}, compression=2.0, name="small", compact=True)


def test_the_trained_reference_resumes_from_its_checkpoint(tmp_path, small_data):
    config = portfolio.BuildConfig(out=tmp_path, model="vgg11", width=0.125, seed=3, train=QUICK)
    context = BuildContext(config, small_data, PortfolioStore(tmp_path))
    first = reference.trained(context)
    checkpoint = tmp_path / "work" / reference.CHECKPOINT
    assert (first.entry.trained_by_build, first.entry.epochs, first.entry.level) == (True, 1, None)
    assert first.entry.source == "trained by the build from seed 3"
    saved = load_state(checkpoint)
    dense = context.new_model()
    dense.load_state_dict(saved["model"])
    assert saved["epoch"] == 1 and first.entry.params == models.count_params(dense)
    assert first.entry.accuracy == evaluate(dense, small_data.info, small_data.test)
    written = checkpoint.stat().st_mtime_ns
    again = reference.trained(context)
    assert again.entry == first.entry and checkpoint.stat().st_mtime_ns == written  # resumed: nothing trained


def test_given_reference_weights_are_the_dense_model_compared_with_and_nothing_trains(tmp_path, small_data):
    base = portfolio.BuildConfig(out=tmp_path / "p", method="reconvene", model="vgg11", width=0.125, train=QUICK)
    torch.manual_seed(5)
    dense = BuildContext(base, small_data, PortfolioStore(tmp_path / "p")).new_model().eval()
    save_file(dense.state_dict(), tmp_path / "dense.safetensors")
    config = dataclasses.replace(base, reference_weights=tmp_path / "dense.safetensors")
    given = reference.trained(BuildContext(config, small_data, PortfolioStore(tmp_path / "p")))
    assert given.entry.source == "the given --reference-weights"
    assert (given.entry.trained_by_build, given.entry.epochs) == (False, 0)
    assert given.entry.accuracy == evaluate(dense, small_data.info, small_data.test)
    assert not (tmp_path / "p" / "work" / reference.CHECKPOINT).exists()  # nothing trained
    assert config.settings()["reference_weights"] is not None and base.settings()["reference_weights"] is None
    with pytest.raises(SettingsError, match="--reference-weights is for a method that prunes at initialization"):
        dataclasses.replace(config, method="shifter", method_settings=None)


def test_a_level_0_that_is_not_dense_is_refused(tmp_path, small_data):
    config = portfolio.BuildConfig(out=tmp_path, model="vgg11", width=0.125)
    context = BuildContext(config, small_data, PortfolioStore(tmp_path))
    torch.manual_seed(0)
    model = context.new_model()
    masks = {"classifier.weight": torch.ones_like(model.classifier.weight, dtype=torch.bool)}
    masks["classifier.weight"][0, 0] = False
    params = models.count_params(model)
    with pytest.raises(reference.DenseReferenceError, match="method toy says its level 0 is the dense model"):
        reference.from_level(SparseModel(0, model, masks), context, "toy", params)
    with pytest.raises(reference.DenseReferenceError, match=f"has {params} params \\(the architecture 7\\)"):
        reference.from_level(SparseModel(0, model, {}), context, "toy", 7)
    entry = reference.from_level(SparseModel(0, model, {}), context, "toy", params, accuracy=0.5).entry
    assert (entry.level, entry.accuracy, entry.source, entry.params) == (0, 0.5, "level 0 of toy", params)
