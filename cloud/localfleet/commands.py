"""The argument lists that start a cloud (`prunefleet cloud serve`) or an edge agent (`prunefleet-edge run`)
as `python -m ARGS...`, which is what `processes.start` runs.

Every local start of a cloud or an edge (the demo, the process cluster, the benchmarks, the integration
tests) builds its arguments here, so the flags those processes take are spelled in one place. An option
left at None is not passed at all, so the process keeps its own default for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def transport_args(certs: Path | None) -> list[str]:
    """Mutual TLS with the role's directory of `prunefleet certs init` (`--certs DIR`), or plaintext
    (`--insecure`) when `certs` is None."""
    return ["--insecure"] if certs is None else ["--certs", str(certs)]


def _option(flag: str, value: object | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def cloud_args(
    store: Path,
    *,
    db: Path,
    certs: Path | None,
    port: int = 0,
    metrics_port: int | None = None,
    host: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """A cloud serving the portfolio in `store`, its fleet database in `db`. Port 0 picks a free port
    (the process prints the one it took); without `metrics_port` the cloud serves no metrics. `extra`
    is any further `prunefleet cloud serve` flags, passed as they are."""
    return [
        "cloud.cli",
        "cloud",
        "serve",
        "--store",
        str(store),
        *_option("--host", host),
        "--port",
        str(port),
        *_option("--metrics-port", metrics_port),
        "--db",
        str(db),
        *transport_args(certs),
        *extra,
    ]


def edge_args(
    cloud: str,
    name: str,
    *,
    cache: Path,
    certs: Path | None,
    port: int = 0,
    metrics_port: int = 0,
    threads: int | None = None,
    batch: int | None = None,
    host: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """An edge agent called `name` that reports to the cloud at `cloud` (HOST:PORT) and keeps its
    variant files in `cache`; port 0 picks a free port. `extra` is any further `prunefleet-edge run`
    flags, passed as they are."""
    return [
        "edge.cli",
        "run",
        "--cloud",
        cloud,
        "--name",
        name,
        *_option("--host", host),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--cache",
        str(cache),
        *_option("--threads", threads),
        *_option("--batch", batch),
        *transport_args(certs),
        *extra,
    ]
