"""Malformed variant files through the edge's loading paths: each way a file can be wrong is refused
with a VariantError naming the problem, by `variant.load` (tensor by tensor from disk) and by
`variant.load_bytes` alike; nothing is built, imported or left behind; and hypothesis-damaged files
(bytes, specs, tensor entries) never raise anything else."""

from __future__ import annotations

import sys

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz import files as fuzz_files
from bench.fuzz.fleet import variant_bytes
from cloud.build.store import PortfolioStore, StoreError
from common import tensorfile, variant
from common.files import sha256_bytes

GOOD = variant_bytes(0.125)
CASES = {what: (data, words) for what, data, words in fuzz_files.crafted_files(GOOD)}
DAMAGE = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_the_good_file_loads():
    held = variant.load_bytes(GOOD, expected_sha256=sha256_bytes(GOOD))
    assert held.spec.input_shape == (1, 28, 28)


@pytest.mark.parametrize("what", sorted(CASES))
def test_a_malformed_variant_file_is_refused_naming_the_problem(what, tmp_path):
    data, words = CASES[what]
    path = tmp_path / "variant.safetensors"
    path.write_bytes(data)
    modules = set(sys.modules)
    for load in (
        lambda: variant.load(path, expected_sha256=sha256_bytes(data)),
        lambda: variant.load_bytes(data, expected_sha256=sha256_bytes(data)),
    ):
        with pytest.raises(variant.VariantError) as refused:
            load()
        assert any(word in str(refused.value).lower() for word in words), str(refused.value)
    assert list(tmp_path.iterdir()) == [path]  # nothing left behind
    assert "wave" not in set(sys.modules) - modules  # an import path off the allow-list is never imported


@pytest.mark.parametrize("what", ["header nested 100000 deep", "header with a 5000-digit number", "unknown dtype"])
def test_the_tensor_reader_raises_only_its_own_error(what, tmp_path):
    path = tmp_path / "variant.safetensors"
    path.write_bytes(CASES[what][0])
    with pytest.raises(tensorfile.TensorFileError):
        tensorfile.read(path, variant.MAX_HEADER_BYTES)


def test_a_dtype_that_is_not_a_name_is_refused(tmp_path):
    path = tmp_path / "variant.safetensors"
    path.write_bytes(fuzz_files.with_entry(GOOD, "classifier.bias", dtype=["F32"]))
    with pytest.raises(tensorfile.TensorFileError, match="dtype"):
        tensorfile.read(path, variant.MAX_HEADER_BYTES)


def test_a_file_that_is_not_its_id_is_refused(tmp_path):
    assert fuzz_files.check_file(GOOD, None, tmp_path / "case") is None
    assert "sha256" in str(pytest.raises(variant.VariantError, variant.load_bytes, GOOD, "0" * 64).value)


def test_path_like_ids_are_refused_by_the_fetcher_before_any_io(tmp_path):
    results = fuzz_files.fetcher_ids(tmp_path / "ids")
    assert [problem for _, problem in results] == [None] * len(fuzz_files.PATH_IDS)
    assert not (tmp_path / "ids").exists()
    for vid in fuzz_files.PATH_IDS:
        with pytest.raises(StoreError, match="sha256"):
            PortfolioStore(tmp_path / "store").variant_path(vid)


@DAMAGE
@given(data=fuzz_files.mutations(GOOD))
def test_damaged_bytes_are_refused_or_load_a_usable_variant(data, tmp_path_factory):
    assert fuzz_files.check_file(data, None, tmp_path_factory.mktemp("mutated") / "case") is None


@DAMAGE
@given(data=fuzz_files.specs(GOOD))
def test_specs_with_wild_values_are_refused_or_load_a_usable_variant(data, tmp_path_factory):
    assert fuzz_files.check_file(data, None, tmp_path_factory.mktemp("spec") / "case") is None


@DAMAGE
@given(data=fuzz_files.entries(GOOD))
def test_tensor_entries_with_wild_values_are_refused_or_load_a_usable_variant(data, tmp_path_factory):
    assert fuzz_files.check_file(data, None, tmp_path_factory.mktemp("entries") / "case") is None
