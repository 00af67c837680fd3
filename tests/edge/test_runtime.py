"""The runtime: atomic switching under concurrent requests, input validation, faithful outputs."""

import time

import numpy as np
import pytest
import torch
from edge_helpers import load_variant, write_variant
from helpers import hammering

from common import datasets, variant
from common.wire import TensorError
from edge.loading import cache_loader
from edge.runtime import NotReadyError, Runtime, RuntimeConfig, UnknownVariantError
from edge.variants import VariantInfo


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("variants")
    return (
        load_variant(*write_variant(directory, 0.125, 0.80, seed=0), name="small"),
        load_variant(*write_variant(directory, 0.25, 0.85, seed=1), name="big"),
    )


@pytest.fixture
def runtime(pair):
    runtime = Runtime(RuntimeConfig(slots=2, max_batch=16))
    for held in pair:
        runtime.add(held)
    runtime.switch(pair[0].variant_id, "initial")
    return runtime


def test_not_ready_before_any_switch(pair):
    runtime = Runtime(RuntimeConfig())
    runtime.add(pair[0])
    with pytest.raises(NotReadyError):
        runtime.predict(np.zeros((1, 1, 28, 28), np.uint8))


def test_predict_matches_the_model_on_normalized_pixels(runtime, pair):
    pixels = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    logits, variant_id = runtime.predict(pixels)
    assert variant_id == pair[0].variant_id and logits.dtype == np.float32 and logits.shape == (4, 10)
    x = datasets.normalize(torch.from_numpy(pixels), pair[0].spec.mean, pair[0].spec.std)
    with torch.no_grad():
        expected = pair[0].model(x).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    as_float, _ = runtime.predict(pixels.astype(np.float32) / 255)  # float32 in [0, 1] means the same
    np.testing.assert_allclose(as_float, logits, atol=1e-5)


def test_the_time_inferences_hold_a_slot_adds_up(runtime):
    """What the policy reads as the wall time a request costs on this device: inside the slot only."""
    pixels = np.zeros((4, 1, 28, 28), np.uint8)
    assert runtime.slot_seconds == 0.0
    started = time.perf_counter()
    for _ in range(5):
        runtime.predict(pixels)
    elapsed = time.perf_counter() - started
    assert 0 < runtime.slot_seconds < elapsed


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (2, 28, 28), (0, 1, 28, 28), (17, 1, 28, 28), (1, 1, 28, 27)])
def test_bad_shapes_name_the_expected_shape(runtime, shape):
    with pytest.raises(TensorError) as err:
        runtime.predict(np.zeros(shape, np.float32))
    assert str(err.value) == f"expected shape [N, 1, 28, 28] with 1 <= N <= 16, got {list(shape)}"


def test_bad_dtype_and_non_finite_values_are_rejected(runtime):
    with pytest.raises(TensorError, match=r"dtype float64 .*expected shape \[N, 1, 28, 28\]"):
        runtime.predict(np.zeros((1, 1, 28, 28), np.float64))
    for bad in (np.nan, np.inf):
        pixels = np.zeros((1, 1, 28, 28), np.float32)
        pixels[0, 0, 3, 4] = bad
        with pytest.raises(TensorError, match="NaN or Inf"):
            runtime.predict(pixels)


def test_switch_is_timed_and_refuses_unknown_variants(runtime, pair):
    record = runtime.switch(pair[1].variant_id, "headroom")
    assert (record.from_variant, record.to_variant, record.reason) == (
        pair[0].variant_id,
        pair[1].variant_id,
        "headroom",
    )
    assert 0 < record.switch_us < 10_000
    with pytest.raises(UnknownVariantError):
        runtime.switch("0" * 64)
    assert runtime.active.variant_id == pair[1].variant_id
    with pytest.raises(ValueError):
        runtime.remove(pair[1].variant_id)  # never drop the variant being served
    runtime.remove(pair[0].variant_id)
    assert set(runtime.variants()) == {pair[1].variant_id}


def test_switching_1000_times_under_concurrent_predicts_fails_nothing(runtime, pair):
    ids = {held.variant_id for held in pair}
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    expected = {held.variant_id: runtime_on(held, pixels) for held in pair}
    answers = []

    def request():
        logits, variant_id = runtime.predict(pixels)
        answers.append(variant_id)
        np.testing.assert_allclose(logits, expected[variant_id], atol=1e-5)  # not a mix of two models

    with hammering(request, threads=4) as failures:
        for i in range(1000):
            runtime.switch(pair[i % 2].variant_id, "test")
            time.sleep(0.0005)  # let requests start on both sides of each switch
    assert failures == []
    assert set(answers) == ids  # both variants answered, and nothing else did


def runtime_on(held, pixels):
    single = Runtime(RuntimeConfig())
    single.add(held)
    single.switch(held.variant_id)
    return single.predict(pixels)[0]


def test_a_variant_is_served_optimized_by_default_and_answers_what_it_answers_as_loaded(tmp_path):
    path, sha = write_variant(tmp_path, 0.25, 0.85, seed=3)
    info = VariantInfo(sha, "optimized", 0.85, path.stat().st_size, 0)
    plain, optimized = cache_loader(info, path, optimize=False)(), cache_loader(info, path)()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.model.modules())  # folded
    assert optimized.memory_bytes < plain.memory_bytes  # BatchNorm's tensors folded away
    answers = []
    for loaded_variant in (plain, optimized):
        runtime = Runtime(RuntimeConfig(slots=2, max_batch=16))
        runtime.add(loaded_variant)
        runtime.switch(sha, "initial")
        pixels = np.random.default_rng(1).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
        answers.append(runtime.predict(pixels))
    (logits, served_by), (optimized_logits, optimized_by) = answers
    assert served_by == optimized_by == sha
    np.testing.assert_allclose(optimized_logits, logits, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("optimize", [True, False])
def test_a_variant_loaded_again_skips_the_passes_of_its_first_load_and_answers_the_same(tmp_path, optimize):
    path, sha = write_variant(tmp_path, 0.25, 0.85, seed=4)
    load = cache_loader(VariantInfo(sha, "again", 0.85, path.stat().st_size, 0), path, optimize=optimize)
    passes = []
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: passes.append(module))
    try:
        first = load()
        first_passes, passes[:] = len(passes), []
        again = load()
    finally:
        hook.remove()
    assert first_passes > 0 and passes == []  # checks and warm-up ran once: no forward pass the second time
    assert again.plan == first.plan and (first.plan.folds is None) == (not optimize)
    assert again.model is not first.model and again.memory_bytes == first.memory_bytes
    pixels = np.random.default_rng(2).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(runtime_on(again, pixels), runtime_on(first, pixels))
    other, _ = write_variant(tmp_path, 0.125, 0.8, seed=5)
    path.write_bytes(other.read_bytes())  # the file changed under the cache: still verified on every load
    with pytest.raises(variant.VariantError, match="sha256 does not match"):
        load()
