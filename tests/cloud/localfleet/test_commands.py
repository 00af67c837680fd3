"""The argument lists that start a cloud or an edge say what was asked for to the real command lines and
nothing else; a cluster whose edge does not come up leaves nothing running."""

import socket
from pathlib import Path

import pytest
from helpers import variant_store

from cloud.cli.main import _parser as cloud_parser
from cloud.localfleet import commands, processes
from edge.cli import _parser as edge_parser


def _parse_cloud(args: list[str]):
    assert args[0] == "cloud.cli"  # `python -m cloud.cli` is the `prunefleet` command
    return cloud_parser({}).parse_args(args[1:])


def _parse_edge(args: list[str]):
    assert args[0] == "edge.cli"  # `python -m edge.cli` is the `prunefleet-edge` command
    return edge_parser({}).parse_args(args[1:])


def test_the_cloud_command_line_reads_every_setting_given():
    args = commands.cloud_args(
        Path("store"), db=Path("fleet.sqlite"), certs=Path("certs/cloud"), port=5001, metrics_port=5002, host="0.0.0.0"
    )
    parsed = _parse_cloud(args)
    assert (parsed.command, parsed.action) == ("cloud", "serve")
    assert (parsed.store, parsed.db, parsed.certs) == (Path("store"), Path("fleet.sqlite"), Path("certs/cloud"))
    assert (parsed.host, parsed.port, parsed.metrics_port, parsed.insecure) == ("0.0.0.0", 5001, 5002, False)


def test_further_cloud_flags_are_passed_on_after_the_transport():
    args = commands.cloud_args(
        Path("store"),
        db=Path("fleet.sqlite"),
        certs=Path("certs/cloud"),
        extra=("--ca", "certs/ca", "--edge-hosts", "h"),
    )
    parsed = _parse_cloud(args)
    assert (parsed.certs, parsed.ca, parsed.edge_hosts, parsed.insecure) == (
        Path("certs/cloud"),
        Path("certs/ca"),
        ["h"],
        False,
    )


def test_a_cloud_setting_not_given_keeps_the_cloud_default_and_no_certs_means_plaintext():
    args = commands.cloud_args(Path("store"), db=Path("fleet.sqlite"), certs=None)
    parsed, defaults = _parse_cloud(args), _parse_cloud(["cloud.cli", "cloud", "serve", "--store", "s"])
    assert "--metrics-port" not in args and "--host" not in args
    assert (parsed.metrics_port, parsed.host) == (defaults.metrics_port, defaults.host)
    assert parsed.insecure and parsed.certs is None
    assert parsed.port == 0  # a free port, which the process prints


def test_the_edge_command_line_reads_every_setting_given_and_passes_extra_flags_on():
    args = commands.edge_args(
        "localhost:5001",
        "edge-a",
        cache=Path("cache/edge-a"),
        certs=Path("certs/edge"),
        port=6001,
        metrics_port=6002,
        threads=2,
        batch=4,
        host="0.0.0.0",
        extra=("--batch-delay-ms", "2", "--optimize-models"),
    )
    parsed = _parse_edge(args)
    assert (parsed.cloud, parsed.name, parsed.cache, parsed.certs) == (
        "localhost:5001",
        "edge-a",
        Path("cache/edge-a"),
        Path("certs/edge"),
    )
    assert (parsed.host, parsed.port, parsed.metrics_port, parsed.threads, parsed.batch) == (
        "0.0.0.0",
        6001,
        6002,
        2,
        4,
    )
    assert parsed.batch_delay_ms == 2 and parsed.optimize_models and not parsed.insecure


def test_an_edge_setting_not_given_keeps_the_agent_default():
    args = commands.edge_args("localhost:5001", "edge-a", cache=Path("cache"), certs=None)
    parsed = _parse_edge(args)
    defaults = _parse_edge(["edge.cli", "run", "--cloud", "c:1", "--name", "n", "--cache", "c"])
    assert "--threads" not in args and "--batch" not in args and "--host" not in args
    assert (parsed.threads, parsed.batch, parsed.host) == (defaults.threads, defaults.batch, defaults.host)
    assert (parsed.port, parsed.metrics_port) == (0, 0) and parsed.insecure


@pytest.mark.parametrize("changes", [{"name": ""}, {"args": []}, {"timeout_s": 0.0}])
def test_a_launch_without_a_name_arguments_or_time_is_refused(changes):
    with pytest.raises(ValueError):
        processes.Launch(**{"name": "cloud", "args": ["cloud.cli"], **changes})


def test_a_cluster_whose_edge_does_not_come_up_stops_the_cloud_it_started(tmp_path):
    store = variant_store(tmp_path / "store", widths=(0.125,))
    cloud = processes.Launch("cloud", commands.cloud_args(store.root, db=tmp_path / "fleet.sqlite", certs=None))
    addresses = []

    def edges(address: str) -> list[processes.Launch]:
        addresses.append(address)
        return [processes.Launch("edge", ["edge.cli", "run", "--no-such-flag"], timeout_s=60)]

    with pytest.raises(processes.ProcessError, match="edge did not start"):
        processes.start_cluster(cloud, edges, tmp_path / "logs")
    assert len(addresses) == 1, "the edges are asked for once the cloud serves"
    host, port = addresses[0].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), timeout=5):
        pass
