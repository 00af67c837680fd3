"""`prunefleet cluster load`: closed-loop inference load at every edge the coordinator knows.

Edges are found through the coordinator (the addresses they advertise, read with the operator's
certificate and token) and looked up again every round, so an edge that joins later gets load too; or
they are given (`edges`), and the coordinator is not asked, so a load generator holding only a client
certificate needs no operator token (the compose file's). Predicts go with a client certificate and
never carry the operator token. Inputs are the portfolio's own (`cloud.localfleet.inputs`):
the test images of the data the store given with `--portfolio` was built on, or, with no store at hand,
random pixels of the shape of the portfolio the cloud serves (said in the log). After each round the
client-side p95 latency, request count and answering variant of every edge, per finished unix second,
are appended to a JSON-lines file; the cluster report plots them.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from cloud.admin import operator_client
from cloud.localfleet.demo_report import per_second
from cloud.localfleet.loadgen import LoadGenerator, Phase, Sample
from common.security import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadConfig:
    cloud: str  # HOST:PORT of the coordinator
    out: Path | None = None  # JSON lines, one per edge and second
    clients: int = 2  # closed-loop clients per edge
    think_s: float = 0.0  # pause between a client's requests
    batch: int = 8
    round_s: float = 2.0
    data_dir: Path | None = None
    images: int = 2000  # inputs to draw batches from
    portfolio: Path | None = None  # the store the cloud serves, whose data the inputs come from
    edges: tuple[tuple[str, str], ...] = ()  # fixed (name, HOST:PORT) to load instead of the coordinator's

    def __post_init__(self) -> None:
        if self.clients < 1 or self.batch < 1 or self.images < 1:
            raise ValueError("clients, batch and images must be >= 1")
        if self.think_s < 0 or self.round_s <= 0:
            raise ValueError("think_s must be >= 0 and round_s positive")
        if len({name for name, _ in self.edges}) != len(self.edges) or not all(a for _, a in self.edges):
            raise ValueError("fixed edges need unique names and an address each")


def discover(cloud: str, transport: Transport) -> dict[str, str]:
    """Edge name -> InferenceService address, as registered with the coordinator ({} when unreachable)."""
    try:
        fleet = operator_client.fleet(operator_client.coordinator_stub(cloud, transport))
    except grpc.RpcError as err:
        log.warning("cannot reach the coordinator at %s: %s", cloud, err.code().name)
        return {}
    return {e.edge: e.address for e in fleet.edges if e.address}


def complete_seconds(samples: list[Sample], now: float) -> tuple[list[dict], list[Sample]]:
    """Rows for every finished unix second (edge, t, p95_ms, requests, errors, variant), and the samples
    of the second still running, kept for the next round so no second is split between two rows."""
    cutoff = int(now)
    done = [s for s in samples if int(s.t) < cutoff]
    edges = sorted({s.edge for s in done})
    return (
        [{**row, "edge": edge} for edge in edges for row in per_second(done, edge)],
        [s for s in samples if int(s.t) >= cutoff],
    )


def load_inputs(config: LoadConfig, transport: Transport):
    """The portfolio's inputs (uint8 [N, C, H, W]); None while the cloud cannot say what it serves."""
    from cloud.localfleet import inputs  # torch reads the images: the cluster's other commands start without it

    if config.portfolio:
        return inputs.portfolio_inputs(config.portfolio, config.images, data_dir=config.data_dir)
    try:
        return inputs.served_inputs(config.cloud, transport, config.images)
    except grpc.RpcError as err:
        log.warning("cannot read the served portfolio's input shape from %s: %s", config.cloud, err.code().name)
        return None


def run(config: LoadConfig, stop: threading.Event, transport: Transport, client: Transport | None = None) -> None:
    """Rounds of load until `stop`: the fleet is read with `transport` (the operator's), Predicts go with
    `client` (default `transport`), never with the operator token (`Transport.for_edges`)."""
    images = None
    edges: dict[str, str] = {}
    generator, pending = None, []
    while not stop.is_set():
        found = dict(config.edges) or discover(config.cloud, transport) or edges
        if found and images is None:
            images = load_inputs(config, transport)
        if found != edges and images is not None:
            edges, generator = found, LoadGenerator(found, images, config.batch, client or transport)
            print(
                f"prunefleet cluster load driving load at {len(edges)} edge(s): {', '.join(sorted(edges))}", flush=True
            )
        if generator is None:
            stop.wait(1.0)
            continue
        wall_start = time.time()
        generator.run([Phase("steady", config.round_s, config.clients, config.think_s)])
        fresh, generator.samples = generator.samples, []
        finished, pending = complete_seconds(pending + [replace(s, t=wall_start + s.t) for s in fresh], time.time())
        if config.out:
            with open(config.out, "a") as out:
                out.write("".join(json.dumps(row) + "\n" for row in finished))


def main(config: LoadConfig, transport: Transport, client: Transport | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(config, stop, transport, client)
    return 0


def read(path: Path) -> list[dict]:
    """The rows written so far (a torn last line is skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
