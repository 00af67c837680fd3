"""The machinery under `bench.suites.policy`: its portfolio, the cloud and edge processes it runs against,
and what it asks of them (the edge's profiles, its capacity on one variant, its metrics, its switches).

Kept apart from the suite so that `policy.py` reads as the experiment (plan, trace, scoring, the three
replays) and this module as how it reaches real processes. The load suite builds its portfolio here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cloud.admin import operator_client
from cloud.build import methods, portfolio
from cloud.build.store import PortfolioStore, StoreError
from cloud.build.train import TrainConfig
from cloud.localfleet import commands, processes
from common.files import sha256_bytes, short_id
from common.security import Transport

PLAIN = Transport.plaintext()  # these processes run plaintext (--insecure)
EDGE = "edge-bench"


def build_portfolio(plan: dict, work: Path, data_dir) -> PortfolioStore:
    """The portfolio of this plan, built once (resumable) and kept in the work dir. The plan names a
    method (`shifter` when it names none) and sets any of that method's settings by field name (e.g.
    `compressions` of `reconvene`, `levels` and `rate` of `shifter`); the rest keep their defaults. The
    work dir's name holds a digest of every method setting, so a change of a default builds another."""
    method = methods.get(plan.get("method", "shifter"))
    names = {f.name for f in dataclasses.fields(method.settings)}
    method_settings = method.settings(**{k: v for k, v in plan.items() if k in names})
    digest = short_id(sha256_bytes(json.dumps(dataclasses.asdict(method_settings), sort_keys=True).encode()))
    recipe = "-".join(str(plan[k]) for k in ("width", "subset", "epochs"))
    store = PortfolioStore(work / f"portfolio-{method.name}-{recipe}-{digest}")
    try:
        store.manifest()
        return store
    except StoreError:
        pass
    portfolio.build(
        portfolio.BuildConfig(
            out=store.root,
            method=method.name,
            model="vgg11",
            width=plan["width"],
            subset=plan["subset"],
            test_subset=plan.get("test_subset", 0),
            data_dir=data_dir,
            check_images=64,
            threads=1,
            train=TrainConfig(epochs=plan["epochs"], batch_size=64, progress=False),
            method_settings=method_settings,
        )
    )
    return store


def _launches(
    store: PortfolioStore, fleet: Path, batch: int, edge_cpus: list[int], others: list[int], backend: str | None
) -> tuple[processes.Launch, Callable[[str], list[processes.Launch]]]:
    """The plaintext cloud on `store` (its database in `fleet`) on `others`, and the edges it serves:
    one, `EDGE`, on one thread of `edge_cpus`, its cache in `fleet`, serving with `backend` (None: the
    agent's default)."""
    cloud_args = commands.cloud_args(store.root, db=fleet / "fleet.sqlite", certs=None, metrics_port=0)
    cloud = processes.Launch("cloud", cloud_args, affinity=tuple(others))

    def edges(address: str) -> list[processes.Launch]:
        extra = ("--backend", backend) if backend else ()
        args = commands.edge_args(address, EDGE, cache=fleet / "cache", certs=None, threads=1, batch=batch, extra=extra)
        return [processes.Launch("edge", args, timeout_s=600, affinity=tuple(edge_cpus))]

    return cloud, edges


@contextlib.contextmanager
def cloud_and_edge(
    store: PortfolioStore,
    fleet: Path,
    logs: Path,
    batch: int,
    edge_cpus: list[int],
    others: list[int],
    backend: str | None = None,
) -> Iterator[tuple[processes.Child, processes.Child]]:
    """A cloud and an edge for the length of the block: the edge on `edge_cpus` (serving with `backend`;
    None: the agent's default), the cloud and this process on `others`. Both stop, and this process is
    unpinned again, however the block ends."""
    before = processes.pin_this_process(others)
    children = []
    try:
        children = processes.start_cluster(*_launches(store, fleet, batch, edge_cpus, others, backend), logs)
        yield children[0], children[1]
    finally:
        processes.stop_all(children)
        processes.pin_this_process(before)


def _fleet(cloud):
    return operator_client.fleet(operator_client.coordinator_stub(cloud.address, PLAIN))


def profiles(cloud, count: int) -> dict:
    """The edge's on-device profile of each variant, by variant id, once it has profiled all `count`."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        edge = next((e for e in _fleet(cloud).edges if e.edge == EDGE), None)
        if edge is not None and len(edge.profiles) == count and edge.telemetry.active_variant:
            return {p.variant_id: p for p in edge.profiles}
        time.sleep(0.5)
    raise RuntimeError("the edge never reported a profile of every variant")


def switches(cloud, since: float) -> list:
    """The switch events the edge reported since `since` (unix time)."""
    events = operator_client.events(operator_client.coordinator_stub(cloud.address, PLAIN), EDGE, since)
    return [e.event for e in events if e.event.switched]


def pin(cloud, stub, request, variant_id: str) -> None:
    """Pin and wait until the edge answers on that variant."""
    operator_client.set_policy(cloud.address, PLAIN, pinned_variant=variant_id)
    deadline = time.monotonic() + 60
    while stub.Predict(request, timeout=30).variant_id != variant_id:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge never switched to {short_id(variant_id)}")
        time.sleep(0.1)


def capacity(cloud, stub, request, variant_id: str, seconds: float, clients: int = 4) -> float:
    """Requests per second the edge serves on `variant_id` right now (closed loop, `clients` at once)."""
    pin(cloud, stub, request, variant_id)
    done, stop = [0] * clients, time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            stub.Predict(request, timeout=30)
            done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / seconds


def edge_counts(metrics_address: str, slo_ms: float) -> dict:
    """From the edge's metrics endpoint: its garbage collections so far by generation, and the
    requests it answered and those it answered within `slo_ms` (from the servicer taking a request to
    its answer; the time in gRPC and on the network is not in it)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    samples = families["prunefleet_edge_request_duration_seconds"].samples
    return {
        "gc": {
            s.labels["generation"]: s.value
            for s in families["python_gc_collections"].samples
            if s.name.endswith("_total")
        },
        "answered": sum(s.value for s in samples if s.name.endswith("_count")),
        "within": sum(
            s.value for s in samples if s.name.endswith("_bucket") and abs(float(s.labels["le"]) - slo_ms / 1e3) < 1e-6
        ),
    }
