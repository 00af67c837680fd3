"""The cluster the fault scenarios break: one cloud and its edges as real processes over mutual TLS.

Each edge reaches the cloud through its own `TcpProxy` (its network link, which a scenario may slow
down or cut); clients reach the edges directly. Processes keep their ports across restarts, so a
restarted cloud or edge is found where it was. Portfolios: the base one (a real shifter portfolio)
and payload portfolios (the base plus one new variant file of a few MiB, so its download spans
several chunks and can be cut in the middle).
"""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import torch

from bench.net.tcp_proxy import TcpProxy
from bench.suites.policy_parts import build_portfolio
from cloud.admin import certs, operator_client, upload_client
from cloud.build.store import PortfolioStore, VariantEntry, portfolio_id
from cloud.localfleet import commands, processes
from common import models, variant
from common.files import atomic_write_bytes
from common.security import Transport
from protos import coordinator_pb2

RPC_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_portfolio(plan: dict, work: Path, data_dir) -> Path:
    """A real shifter portfolio of VGG-11 trained briefly on Fashion-MNIST, built once per recipe."""
    recipe = {"method": "shifter", "epochs": 1, "rate": 0.85, **{k: plan[k] for k in ("width", "subset", "levels")}}
    return build_portfolio(recipe, work, data_dir).root


def payload_portfolio(base: Path, root: Path, seed: int, width: float) -> tuple[Path, str]:
    """The base portfolio plus one new variant: an untrained VGG-11 at `width` (weights from `seed`),
    named as such and with chance accuracy, so the policy never prefers it. Returns (store, its id)."""
    source = PortfolioStore(base)
    manifest = source.manifest()
    store = PortfolioStore(root)
    reference = variant.load(source.variant_path(manifest.variants[0].variant_id)).spec
    kwargs = models.zoo_kwargs(reference.input_shape, reference.num_classes, width)
    torch.manual_seed(seed)
    model = models.build("vgg11", kwargs)
    spec = dataclasses.replace(
        reference, kwargs=kwargs, method="dense", sparsity=0.0, accuracy=0.1, name=f"payload-{seed}", level=0
    )
    extra = store.put_variant(variant.encode(model, spec))
    for held in sorted((source.root / "variants").glob("*.*")):  # every member's files, whatever their format
        if not (store.root / "variants" / held.name).exists():
            atomic_write_bytes(store.root / "variants" / held.name, held.read_bytes())
    size = store.variant_path(extra).stat().st_size
    added = VariantEntry(
        extra,
        f"payload-{seed}",
        0,
        "dense",
        "vgg11",
        models.count_params(model),
        size,
        0.1,
        0.1,
        0.0,
        1.0,
        1.0,
        0.0,
        0.0,
    )
    variants = (*manifest.variants, added)
    store.write_manifest(
        dataclasses.replace(manifest, variants=variants, portfolio_id=portfolio_id([v.variant_id for v in variants]))
    )
    return store.root, extra


def _kill(child: processes.Child) -> float:
    """SIGKILL; the time just before the signal (a request it fails may end before the process is reaped)."""
    at = time.time()
    child.process.send_signal(signal.SIGKILL)
    child.process.wait(30)
    return at


@dataclasses.dataclass
class Edge:
    name: str
    port: int
    metrics_port: int
    cache: Path
    proxy: TcpProxy
    flags: tuple[str, ...] = ()
    child: processes.Child | None = None
    starts: int = 0
    started_at: float = 0.0  # when the current process was started (unix seconds)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def part(self, variant_id: str) -> Path:
        return self.cache / f"{variant_id}.part"


class Cluster:
    def __init__(self, work: Path, store: Path, edges: dict[str, tuple[str, ...]]):
        self.work, self.store, self.logs = work, store, work / "logs"
        self.keys = certs.init(work / "certs", force=True)
        self.operator = Transport.load(self.keys["operator"], token=True)
        self.client = Transport.load(self.keys["client"])  # Predicts: a client certificate, never the token
        self.db = work / "fleet.sqlite"
        self.port = free_port()
        self.cloud: processes.Child | None = None
        self.cloud_starts = 0
        self.edges = {
            name: Edge(name, free_port(), free_port(), work / "cache" / name, TcpProxy(self.port), flags)
            for name, flags in edges.items()
        }
        self._stub = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stub(self):
        if self._stub is None:
            self._stub = operator_client.coordinator_stub(self.address, self.operator)
        return self._stub

    # --- processes -------------------------------------------------------------------------------------
    def start_cloud(self) -> processes.Child:
        self.cloud_starts += 1
        args = commands.cloud_args(self.store, db=self.db, certs=self.keys["cloud"], port=self.port, metrics_port=0)
        self.cloud = processes.start(f"cloud-{self.cloud_starts}", args, self.logs)
        return self.cloud

    def bytes_sent(self) -> int:
        """Variant bytes the running cloud process has handed to gRPC since it started."""
        text = urllib.request.urlopen(f"http://{self.cloud.metrics_address}/metrics", timeout=10).read().decode()
        return int(float(re.search(r"^prunefleet_cloud_variant_bytes_sent_total (\S+)$", text, re.M).group(1)))

    def kill_cloud(self) -> float:
        """SIGKILL the cloud; the time the signal was sent."""
        return _kill(self.cloud)

    def start_edge(self, name: str, timeout_s: float = 300.0) -> processes.Child:
        edge = self.edges[name]
        edge.starts += 1
        edge.started_at = time.time()
        args = commands.edge_args(
            f"localhost:{edge.proxy.port}",
            name,
            cache=edge.cache,
            certs=certs.issue_holder(self.keys["cloud"].parent, "edge", name),  # each edge its own
            port=edge.port,
            metrics_port=edge.metrics_port,
            batch=2,
            extra=edge.flags,
        )
        edge.child = processes.start(f"{name}-{edge.starts}", args, self.logs, timeout_s=timeout_s)
        return edge.child

    def kill_edge(self, name: str) -> float:
        return _kill(self.edges[name].child)

    def close(self) -> None:
        for edge in self.edges.values():
            if edge.child is not None:
                edge.child.stop()
            edge.proxy.close()
        if self.cloud is not None:
            self.cloud.stop()

    # --- the coordinator ---------------------------------------------------------------------------------
    def fleet(self) -> coordinator_pb2.GetFleetResponse:
        return operator_client.fleet(self.stub())

    def rollouts(self) -> list:
        return list(self.stub().ListRollouts(coordinator_pb2.ListRolloutsRequest(limit=100), timeout=RPC_S).rollouts)

    def events(self, edge: str = "", since: float = 0.0) -> list:
        return operator_client.events(self.stub(), edge, since)

    def deploy(self, store: Path, edges: str, min_windows: int, canaries: str, adopt_timeout_s: float = 240.0):
        """Upload `store` and roll it out to `edges`, `canaries` (names) first."""
        uploaded = upload_client.upload(self.address, self.operator, store)  # the cloud deploys no path of its host
        request = coordinator_pb2.DeployRequest(
            portfolio=uploaded.portfolio_id,
            edges=edges,
            canaries=canaries,
            thresholds=coordinator_pb2.RolloutThresholds(min_windows=min_windows, adopt_timeout_s=adopt_timeout_s),
        )
        return self.stub().Deploy(request, timeout=60).rollout

    def pin(self, edges: str, variant_id: str):
        return self.stub().Pin(coordinator_pb2.PinRequest(edges=edges, variant_id=variant_id), timeout=RPC_S)

    def set_policy(self, **changes) -> coordinator_pb2.Policy:
        return operator_client.set_policy(self.address, self.operator, **changes)
