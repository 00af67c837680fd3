"""The edge's disk: one agent per cache directory (a second real agent refuses to start, naming the
directory and the holder), and a cache that keeps only what the held and desired portfolios need plus
the margin, without stale partial downloads; and what the edge logs of names from the cloud, escaped."""

import os
import subprocess
import sys
import threading
import time

import pytest
from edge_helpers import FakeCloud, portfolio_of, wait_for

from common.security import Transport
from edge.agent import initial_portfolio
from edge.cache import LOCK_NAME, CacheInUse, CacheLock, tidy
from edge.config import AgentConfig
from edge.node import assemble

HOUR = 3600.0


def _edge_command(cloud: str, name: str, cache, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "edge.cli",
        "run",
        "--cloud",
        cloud,
        "--name",
        name,
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--cache",
        str(cache),
        "--insecure",
        *extra,
    ]


def test_a_second_agent_on_one_cache_refuses_to_start_naming_the_directory_and_the_holder(tmp_path):
    cache = tmp_path / "cache"
    config = AgentConfig(cloud="127.0.0.1:1", name="edge-first", cache_dir=cache)
    node = assemble(config, threading.Event(), Transport.plaintext())  # the first agent holds the cache
    try:
        with pytest.raises(CacheInUse, match=f"pid {os.getpid()}"):
            CacheLock.acquire(cache)
        second = subprocess.run(
            _edge_command("127.0.0.1:1", "edge-second", cache), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2 and second.stdout == ""
        assert str(cache.resolve()) in second.stderr and f"pid {os.getpid()}" in second.stderr
        assert "edge-second serving" not in second.stderr
    finally:
        node.close()
    CacheLock.acquire(cache).release()  # the first agent gone, the directory is free again


def _file(directory, name: str, size: int, age_s: float, now: float):
    path = directory / name
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_tidy_keeps_what_is_needed_and_the_newest_spare_files_within_the_margin(tmp_path):
    now = time.time()
    held, desired, old, older, oldest, w, r = (f"{i:064x}" for i in range(7))
    keep = [
        _file(tmp_path, f"{held}.safetensors", 500, 10 * HOUR, now),  # needed, however old
        _file(tmp_path, f"{desired}.part", 100, 60, now),  # a recent download of a needed variant
        _file(tmp_path, f"{old}.safetensors", 300, HOUR, now),  # the newest spare file fits the margin
        _file(tmp_path, f"{w}.part", 100, 2 * HOUR, now),  # being written: never touched
        _file(tmp_path, LOCK_NAME, 6, 2 * HOUR, now),
        _file(tmp_path, "notes.txt", 10, 2 * HOUR, now),  # not the agent's
    ]
    gone = [
        _file(tmp_path, f"{older}.safetensors", 300, 2 * HOUR, now),  # spare beyond the margin
        _file(tmp_path, f"{oldest}.safetensors", 100, 3 * HOUR, now),  # spare beyond the margin
        _file(tmp_path, f"{desired[:-1]}f.part", 100, 60, now),  # a download no portfolio needs
        _file(tmp_path, f"{r}.part", 100, 2 * HOUR, now),  # stale
    ]
    removed = tidy(tmp_path, {held, desired, r}, margin_bytes=500, stale_part_s=HOUR, now=now, writing={w})
    assert sorted(removed) == sorted(gone)
    assert all(path.exists() for path in keep) and not any(path.exists() for path in gone)
    assert tidy(tmp_path, {held, desired}, 500, HOUR, now, writing={w}) == []  # nothing more to do


@pytest.fixture
def portfolio(tmp_path_factory):
    return portfolio_of(tmp_path_factory.mktemp("variants"), [("small", 0.125, 0.80), ("big", 0.25, 0.85)])


def test_an_agent_removes_what_it_no_longer_needs_and_keeps_what_it_serves(portfolio, tmp_path):
    files, (small, big) = portfolio
    cache, now = tmp_path / "cache", time.time()
    cache.mkdir()
    stale = _file(cache, f"{1:064x}.part", 1000, 2 * HOUR, now)  # an abandoned download
    left = _file(cache, f"{2:064x}.safetensors", 1000, HOUR, now)  # a variant of an earlier portfolio
    cloud = FakeCloud(files, [small, big])
    config = AgentConfig(
        cloud=cloud.start(), name="edge-d", cache_dir=cache, profile_iters=2, batch=4, cache_margin_mib=0.0
    )
    node = assemble(config, threading.Event(), Transport.plaintext())
    try:
        assert initial_portfolio(node.agent, node.link)
        node.agent.start_serving()
        names = {p.name for p in cache.iterdir()}
        assert names == {LOCK_NAME, f"{small.variant_id}.safetensors", f"{big.variant_id}.safetensors"}
        assert not stale.exists() and not left.exists()
        node.agent.adopt_portfolio([small])  # the coordinator names a portfolio without `big`
        assert set(node.agent.runtime.variants()) == {small.variant_id}
        assert {p.name for p in cache.iterdir()} == {LOCK_NAME, f"{small.variant_id}.safetensors"}
    finally:
        node.close()
        cloud.stop()


def test_names_from_the_cloud_reach_the_edge_log_and_its_reports_escaped(tmp_path):
    files, infos = portfolio_of(tmp_path / "variants", [("small", 0.125, 0.80)])
    infos[0].name = "small\n2000-01-01 00:00:00 edge INFO FORGED\x1b[31m"
    cloud = FakeCloud(files, infos)
    process = subprocess.Popen(
        _edge_command(cloud.start(), "edge-e", tmp_path / "cache", "--log-level", "info", "--batch", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        event = wait_for(lambda: cloud.switches(), 90, "the initial switch event")[0]
        assert "FORGED" in event.reason and event.reason.isprintable()  # sent escaped, as the cloud accepts
    finally:
        process.terminate()
        _, log = process.communicate(timeout=30)
        cloud.stop()
    assert "FORGED" in log and "\x1b" not in log
    assert not any(line.startswith("2000-01-01") for line in log.splitlines())


def test_the_cache_settings_are_checked_naming_them(tmp_path):
    with pytest.raises(ValueError, match="cache_margin_mib"):
        AgentConfig(cloud="c:1", name="e", cache_dir=tmp_path, cache_margin_mib=-1)
    with pytest.raises(ValueError, match="edge name"):
        AgentConfig(cloud="c:1", name="edge one", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="advertise_host"):
        AgentConfig(cloud="c:1", name="e", cache_dir=tmp_path, advertise_host="h\nx")
