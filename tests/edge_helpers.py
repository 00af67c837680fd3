"""Helpers shared by the edge tests: small real variant files and loaded variants (not a test module)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch
from helpers import wait_for  # noqa: F401  (re-exported for the edge tests)

from common import listing as listings
from common import models, variant
from common.files import portfolio_id
from common.variant import VariantSpec
from edge.variants import LoadedVariant, VariantInfo, loaded
from protos import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    portfolio_pb2,
    portfolio_pb2_grpc,
)


def spec(width: float, accuracy: float) -> VariantSpec:
    return VariantSpec(
        arch="vgg11",
        kwargs={"width": width, "in_channels": 1, "input_size": 28, "num_classes": 10},
        input_shape=(1, 28, 28),
        num_classes=10,
        mean=(0.286,),
        std=(0.353,),
        method="dense",
        sparsity=0.0,
        accuracy=accuracy,
    )


def write_variant(directory: Path, width: float = 0.125, accuracy: float = 0.8, seed: int = 0) -> tuple[Path, str]:
    """A vgg11 variant file named by its sha256; returns (path, sha256)."""
    torch.manual_seed(seed)
    variant_spec = spec(width, accuracy)
    model = models.build("vgg11", variant_spec.kwargs).eval()
    tmp = Path(directory) / f"tmp-{width}-{seed}.safetensors"
    sha = variant.save(model, variant_spec, tmp)
    path = tmp.with_name(f"{sha}.safetensors")
    tmp.replace(path)
    return path, sha


def load_variant(path: Path, sha: str, name: str) -> LoadedVariant:
    held = variant.load(path, expected_sha256=sha)
    params = models.count_params(held.model)
    return loaded(VariantInfo(sha, name, held.spec.accuracy, held.size_bytes, params), held.spec, held.model)


class FakeCloud(coordinator_pb2_grpc.CoordinatorServiceServicer, portfolio_pb2_grpc.PortfolioServiceServicer):
    """A coordinator and portfolio service in one in-process server, recording what edges send.
    `files` maps variant id -> bytes served for it (which may be wrong on purpose). With a `signer`,
    Register also gives the listing of `infos` signed under `version` (`listing`), as the cloud does."""

    def __init__(self, files: dict[str, bytes], infos: list[portfolio_pb2.VariantInfo], policy=None, signer=None):
        self.files, self.infos, self.signer, self.version = files, infos, signer, 1
        self.policy = policy or coordinator_pb2.Policy(slo_ms=1000.0, dwell_s=0.0, version=1)
        self.registrations: list[coordinator_pb2.RegisterRequest] = []
        self.reports: list[coordinator_pb2.EdgeReport] = []
        self.streams: list[list[coordinator_pb2.EdgeReport]] = []
        self.directives: queue.Queue = queue.Queue()
        self.server: grpc.Server | None = None
        self.port = 0

    def Register(self, request, context):
        self.registrations.append(request)
        reply = coordinator_pb2.RegisterResponse(policy=self.policy, variants=self.infos, portfolio_id="p1")
        if self.signer is not None:
            reply.portfolio.CopyFrom(self.listing())
        return reply

    def listing(self, infos=None, version=None, expires_at=None) -> portfolio_pb2.ListVariantsResponse:
        """`infos` (default: the cloud's) listed under `version` (default: the cloud's), signed by its signer."""
        infos = self.infos if infos is None else infos
        base = portfolio_pb2.ListVariantsResponse(
            variants=infos, portfolio_id=portfolio_id(v.variant_id for v in infos)
        )
        expires_at = int(time.time()) + 3600 if expires_at is None else expires_at
        return listings.signed(base, self.version if version is None else version, expires_at, self.signer)

    def Connect(self, request_iterator, context):
        stream: list = []
        self.streams.append(stream)

        def consume():
            try:
                for report in request_iterator:
                    stream.append(report)
                    self.reports.append(report)
            except grpc.RpcError:
                pass  # the edge went away

        threading.Thread(target=consume, daemon=True).start()
        yield coordinator_pb2.Directive(policy=self.policy)
        while context.is_active():
            try:
                yield self.directives.get(timeout=0.1)
            except queue.Empty:
                continue

    def FetchVariant(self, request, context):
        data = self.files.get(request.variant_id)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such variant")
        for offset in range(request.offset, len(data), 64 << 10):
            yield portfolio_pb2.VariantChunk(
                offset=offset, data=data[offset : offset + (64 << 10)], total_size=len(data), sha256=request.variant_id
            )

    def start(self, port: int = 0) -> str:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(self, self.server)
        portfolio_pb2_grpc.add_PortfolioServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0).wait()

    def switches(self) -> list[coordinator_pb2.SwitchEvent]:
        return [r.switch for r in list(self.reports) if r.WhichOneof("body") == "switch"]


def portfolio_of(directory: Path, variants: list[tuple[str, float, float]]):
    """Write variants (name, width, accuracy); returns (files by id, VariantInfo list)."""
    files, infos = {}, []
    for seed, (name, width, accuracy) in enumerate(variants):
        path, sha = write_variant(directory, width, accuracy, seed)
        files[sha] = path.read_bytes()
        infos.append(
            portfolio_pb2.VariantInfo(
                variant_id=sha,
                sha256=sha,
                size_bytes=len(files[sha]),
                name=name,
                accuracy=accuracy,
                params=1,
                method="dense",
            )
        )
    return files, infos
