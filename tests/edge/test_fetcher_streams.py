"""Crafted download streams at the fetcher: whatever the chunks claim (offsets, declared sizes, ids,
data, streams cut short or running on), the fetcher returns a file that hashes to its id or raises
FetchError, and the cache holds nothing but the verified file and the download in progress."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from bench.fuzz import streams as fuzz_streams
from bench.fuzz.fleet import variant_bytes
from common.files import sha256_bytes

GOOD = variant_bytes(0.0625)


def test_an_undamaged_stream_is_fetched_and_verified(tmp_path):
    assert fuzz_streams.check_stream(GOOD, [], tmp_path / "case") is None
    assert (tmp_path / "case" / "cache" / f"{sha256_bytes(GOOD)}.safetensors").read_bytes() == GOOD


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(script=fuzz_streams.scripts(len(GOOD)))
def test_a_crafted_stream_ends_verified_or_refused_and_leaves_only_cache_files(script, tmp_path_factory):
    assert fuzz_streams.check_stream(GOOD, script, tmp_path_factory.mktemp("stream") / "case") is None
