"""The fleet the fuzz runs against: a real cloud and a real edge process on loopback, mutual TLS and the
operator token as in production, a small portfolio of real variant files; the calls, health checks
and file-system snapshots the fuzz needs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.fuzz.cases import FUZZ_EDGE, Known
from bench.fuzz.rules import Rpc
from cloud.admin import certs
from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from cloud.localfleet import commands, processes
from common import models, variant
from common.files import sha256_file
from common.security import Transport
from common.variant import VariantSpec
from edge.cache import LOCK_NAME
from edge.listing_guard import STATE_NAME
from protos import coordinator_pb2, coordinator_pb2_grpc

INPUT_SHAPE = (1, 28, 28)
MAX_BATCH = 64
WRONG_TOKEN = "not-the-operator-token-0123456789"
TIMEOUT_S = 10.0


def spec(kwargs: dict, accuracy: float) -> VariantSpec:
    return VariantSpec(
        arch="vgg11",
        kwargs=kwargs,
        input_shape=INPUT_SHAPE,
        num_classes=10,
        mean=(0.5,),
        std=(0.25,),
        method="dense",
        sparsity=0.0,
        accuracy=accuracy,
    )


def entry(variant_id: str, size: int, level: int, accuracy: float = 0.5) -> VariantEntry:
    return VariantEntry(
        variant_id, f"vgg11-L{level}", level, "dense", "vgg11", 0, size, accuracy, accuracy, 0.0, 1.0, 1.0, 1.0, 2.0
    )


def write_store(root: Path, files: list[bytes]) -> PortfolioStore:
    """A store holding these variant files, in this order (accuracy falling with the level)."""
    store = PortfolioStore(root)
    entries = [entry(store.put_variant(data), len(data), level, 0.9 - level / 100) for level, data in enumerate(files)]
    store.write_manifest(
        Manifest(
            portfolio_id([e.variant_id for e in entries]),
            "vgg11",
            "fashion-mnist",
            "dense",
            time.time(),
            {},
            tuple(entries),
        )
    )
    return store


def variant_bytes(width: float) -> bytes:
    """A real (untrained) vgg11 variant file for 1x28x28 inputs."""
    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10, "width": width}
    return variant.encode(models.build("vgg11", kwargs), spec(kwargs, 0.5))


def start_cloud(store: Path, work: Path, keys: dict, name: str = "cloud") -> processes.Child:
    return processes.start(name, cloud_args(store, work, keys, name), work / "logs")


def start_edge(cloud: processes.Child, work: Path, keys: dict, name: str, *extra: str) -> processes.Child:
    return processes.start(name, edge_args(cloud.address, work, keys, name, *extra), work / "logs")


def cloud_args(store: Path, work: Path, keys: dict, name: str = "cloud") -> list[str]:
    return commands.cloud_args(store, db=work / f"{name}.sqlite", certs=keys["cloud"])


def edge_args(cloud: str, work: Path, keys: dict, name: str, *extra: str) -> list[str]:
    """An edge answering batches of 2 (up to MAX_BATCH) on one thread, its cache in WORK/NAME-cache."""
    flags = ("--max-batch", str(MAX_BATCH), *extra)
    return commands.edge_args(
        cloud,
        name,
        cache=work / f"{name}-cache",
        certs=certs.issue_holder(keys["cloud"].parent, "edge", name),  # each edge its own certificate
        threads=1,
        batch=2,
        extra=flags,
    )


def serving(channel: grpc.Channel, timeout_s: float = 5.0) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(channel: grpc.Channel, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if serving(channel):
            return True
        time.sleep(0.3)
    return False


def call(
    channel: grpc.Channel, rpc: Rpc, request, raw: bool = False, metadata=None
) -> tuple[grpc.StatusCode, str, list]:
    """One call of `rpc` with `request` (a message, a list of them for a bidirectional stream, or raw
    bytes) and any extra `metadata`; the status code, its message and the replies."""
    serialize = (lambda b: b) if raw else rpc.request.SerializeToString
    kwargs = {"request_serializer": serialize, "response_deserializer": rpc.reply.FromString}
    extra = {"timeout": TIMEOUT_S, "metadata": metadata}
    try:
        if rpc.kind == "unary":
            replies = [channel.unary_unary(rpc.method, **kwargs)(request, **extra)]
        elif rpc.kind == "server_stream":
            replies = list(channel.unary_stream(rpc.method, **kwargs)(request, **extra))
        else:
            replies = list(channel.stream_stream(rpc.method, **kwargs)(iter(request), **extra))
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []
    return grpc.StatusCode.OK, "", replies


def snapshot(trees: list[Path], tops: list[Path], allowed: list[Path]) -> set[Path]:
    """Every path in `trees` (recursively) and in `tops` (their entries only) that is not under an
    allowed directory or the cloud's database (`*.sqlite*`). Hypothesis keeps its own cache
    (`.hypothesis`) in the client's directory."""
    found = {p for top in tops if top.is_dir() for p in top.iterdir() if p.name != ".hypothesis"}
    for root in trees:
        if root.is_dir():
            found.update(p for p in root.rglob("*") if not any(p == a or a in p.parents for a in allowed))
    return {p for p in found if ".sqlite" not in p.name}


def cache_problems(cache: Path) -> list[str]:
    """A verified cache holds only <sha256>.safetensors files that hash to their names (and the lock
    file of the agent using it)."""
    problems = []
    for path in sorted(cache.iterdir()) if cache.is_dir() else ():
        if path.name in (LOCK_NAME, STATE_NAME):
            continue
        if path.suffix != ".safetensors" or sha256_file(path) != path.stem:
            problems.append(f"{path.name} in the edge cache is not a verified variant file")
    return problems


def log_problems(path: Path) -> list[str]:
    """Tracebacks in a process's log other than gRPC's own refusal of bytes that do not parse: an
    exception no handler expected, in a servicer or in a thread."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    problems = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback") and not (i and "Exception deserializing" in lines[i - 1]):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j] and not lines[j].startswith((" ", "\t"))),
                len(lines) - 1,
            )
            problems.append(f"{path.stem} logged {lines[end][:200]}")
    return problems


@dataclass
class Fleet:
    """The processes and the channels the fuzz calls through: one per role and token on the cloud, one
    per edge (edge-f answers each request alone, edge-b micro-batches)."""

    cloud: processes.Child
    edges: dict  # name -> processes.Child
    store: PortfolioStore
    known: Known
    channels: dict  # "edge" (edge certificate, no token), "right", "none", "wrong" (operator), "plain"
    edge_channels: dict  # edge name -> channel
    work: Path

    def channel(self, rpc: Rpc, route: str) -> grpc.Channel:
        """`route`: the token for an operator RPC, the edge for Predict."""
        if rpc.name == "Predict":
            return self.edge_channels.get(route, self.edge_channels["edge-f"])
        if route == "forged":  # the token comes as metadata the caller forged
            route = "none"
        return self.channels[route if rpc.operator else "edge"]

    def routes(self, rpc: Rpc) -> tuple[str, ...]:
        if rpc.name == "Predict":
            return tuple(self.edge_channels)
        return ("right", "right", "right", "none", "wrong", "forged") if rpc.operator else ("right",)

    def undo(self, rpc: Rpc, code: grpc.StatusCode, replies: list) -> None:
        """A deploy that went through is rolled back, so the next one is judged on its own request
        rather than refused for the rollout in progress."""
        if rpc.name == "Deploy" and code == grpc.StatusCode.OK:
            rollback = coordinator_pb2.RollbackRequest(rollout_id=replies[0].rollout.id, reason="fuzz")
            coordinator_pb2_grpc.CoordinatorServiceStub(self.channels["right"]).Rollback(rollback, timeout=TIMEOUT_S)

    def alive(self) -> list[str]:
        children = {"cloud": self.cloud, **self.edges}
        channels = {"cloud": self.channels["edge"], **self.edge_channels}
        return [
            f"{name} is down or not serving"
            for name, child in children.items()
            if child.process.poll() is not None or not serving(channels[name])
        ]

    def logs(self) -> list[str]:
        return [p for child in (self.cloud, *self.edges.values()) for p in log_problems(child.log_path)]

    def stop(self) -> None:
        for channel in (*self.channels.values(), *self.edge_channels.values()):
            channel.close()
        for child in (*self.edges.values(), self.cloud):
            child.stop()


def _channels(keys: dict, address: str) -> dict:
    operator = Transport.load(keys["operator"], token=True)
    return {
        "edge": Transport.load(certs.issue_holder(keys["cloud"].parent, "edge", FUZZ_EDGE)).channel(address),
        "right": operator.channel(address),
        "none": Transport(operator.ca, operator.cert, operator.key).channel(address),
        "wrong": Transport(operator.ca, operator.cert, operator.key, WRONG_TOKEN).channel(address),
        "plain": Transport.plaintext().channel(address),
    }


def start_fleet(work: Path) -> Fleet:
    keys = certs.init(work / "certs", force=True)
    store = write_store(work / "store", [variant_bytes(0.125), variant_bytes(0.0625)])
    flags = {"edge-f": (), "edge-b": ("--batch-delay-ms", "2")}  # edge-b micro-batches
    cloud, *started = processes.start_cluster(
        processes.Launch("cloud", cloud_args(store.root, work, keys)),
        lambda address: [processes.Launch(n, edge_args(address, work, keys, n, *f)) for n, f in flags.items()],
        work / "logs",
    )
    edges = dict(zip(flags, started))
    edge_role = Transport.load(keys["client"])  # what applications call Predict with
    manifest = store.manifest()
    known = Known(
        tuple(v.variant_id for v in manifest.variants),
        {v.variant_id: v.size_bytes for v in manifest.variants},
        manifest.portfolio_id,
        ("edge-f", "edge-b", "fuzz-edge"),
        INPUT_SHAPE,
        MAX_BATCH,
    )
    fleet = Fleet(
        cloud,
        edges,
        store,
        known,
        _channels(keys, cloud.address),
        {name: edge_role.channel(child.address) for name, child in edges.items()},
        work,
    )
    if not all(wait_serving(channel, 120) for channel in fleet.edge_channels.values()):
        fleet.stop()
        raise RuntimeError("an edge did not start serving")
    return fleet
