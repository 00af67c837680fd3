"""The runtime under a memory budget: eviction, on-demand loads from real files, and switching under load."""

import numpy as np
import pytest
from edge_helpers import load_variant, write_variant
from helpers import hammering

from edge.runtime import Runtime, RuntimeConfig, UnknownVariantError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("variants")
    return [write_variant(directory, width, 0.8 + i / 100, seed=i) for i, width in enumerate((0.125, 0.25, 0.25))]


def _budgeted(files, budget_variants: float):
    """A runtime holding every variant with a loader that counts its calls; the budget fits
    `budget_variants` of the biggest."""
    held = [load_variant(path, sha, f"v{i}") for i, (path, sha) in enumerate(files)]
    budget = int(budget_variants * max(h.memory_bytes for h in held))
    runtime, loads = Runtime(RuntimeConfig(slots=2, memory_budget_bytes=budget)), []

    def loader(path, sha, name):
        def load():
            loads.append(sha)
            return load_variant(path, sha, name)

        return load

    evicted = []
    for i, h in enumerate(held):
        evicted += runtime.add(h, loader(*files[i], f"v{i}"))
        if i == 0:
            runtime.switch(h.variant_id, "initial")
    return runtime, held, loads, evicted, budget


def test_adding_beyond_the_budget_evicts_all_but_the_active_and_keeps_them_known(files):
    runtime, held, loads, evicted, budget = _budgeted(files, 1.5)
    assert set(runtime.variants()) == {h.variant_id for h in held}  # still known, loadable on demand
    assert runtime.active.variant_id in runtime.resident()
    assert runtime.resident_bytes() <= budget and evicted and loads == []
    assert runtime.resident_bytes() == sum(v.memory_bytes for v in runtime.resident().values())


def test_a_switch_to_an_evicted_variant_loads_it_records_the_cost_and_stays_in_budget(files):
    runtime, held, loads, _, budget = _budgeted(files, 1.0)
    target = next(h for h in held if h.variant_id not in runtime.resident())
    pixels = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    before = runtime.active.variant_id
    record = runtime.switch(target.variant_id, "test")
    assert loads == [target.variant_id] and record.load_s > 0 and record.from_variant == before
    assert before in record.evicted and set(runtime.resident()) == {target.variant_id}  # 1 variant fits
    assert runtime.resident_bytes() <= budget
    logits, answered_by = runtime.predict(pixels)
    reference = Runtime(RuntimeConfig())
    reference.add(target)
    reference.switch(target.variant_id)
    np.testing.assert_allclose(logits, reference.predict(pixels)[0], atol=1e-5)  # rebuilt from its file
    assert answered_by == target.variant_id
    assert runtime.switch(target.variant_id).load_s == 0.0 and len(loads) == 1  # resident: no load


def test_a_variant_without_loader_is_never_evicted_and_unknown_ones_are_refused(files):
    held = [load_variant(path, sha, "x") for path, sha in files[:2]]
    runtime = Runtime(RuntimeConfig(memory_budget_bytes=1))
    for h in held:
        assert runtime.add(h) == ()  # nothing could be loaded again: nothing is evicted
    with pytest.raises(UnknownVariantError):
        runtime.switch("0" * 64)


def test_switching_among_variants_that_do_not_all_fit_fails_no_request(files):
    runtime, held, loads, _, budget = _budgeted(files, 2.0)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    answers = []
    with hammering(lambda: answers.append(runtime.predict(pixels)[1]), threads=3) as failures:
        for i in range(60):
            runtime.switch(held[i % 3].variant_id, "test")
            assert runtime.resident_bytes() <= budget
            assert len(runtime.resident()) <= 2  # never more than the two variants of a switch
    assert failures == [] and set(answers) == {h.variant_id for h in held}
    assert len(loads) >= 20  # round robin over three with room for two: most switches load
