"""The arena the attacks run in: a real cloud process on loopback speaking mutual TLS, with the
certificates `prunefleet certs init` and `prunefleet certs issue edge|client NAME` write (run as the
operator runs them), two small portfolios of real variant files, and the callers each role holds.

Every process is started from `cloud.localfleet.commands` (as the demo and the process cluster start
theirs) and stopped by `close`. Tools are run as the operator runs them, `prunefleet ...` in a process
of its own (`cli`). Attacks that need a cloud started otherwise (another certificate, other flags) or a
real edge agent ask for one here (`start_cloud`, `start_edge`), and `close` stops those too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc

from bench.fuzz.fleet import variant_bytes, write_store
from cloud.localfleet import commands, processes
from cloud.service.coordinator import BIND_TIMEOUT_S as DEFAULT_BIND_TIMEOUT_S  # a cloud without --bind-timeout
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc, inference_pb2_grpc, portfolio_pb2_grpc

EDGES = ("edge-a", "edge-b", "edge-c")  # edge-c is the real agent some attacks need (`Arena.edge`)
CLIENT = "app"
MAX_RPCS = 16  # the fleet's pool of the arena's cloud: the flood opens more streams than this
BIND_TIMEOUT_S = 3.0  # the arena's cloud closes a stream that has not reported within this (--bind-timeout)
RPC_S = 10.0


def cli(*args: str, env: dict | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """`prunefleet ARGS` in a process of its own (as `python -m cloud.cli`, how local processes run it)."""
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The result of a command the arena needs to have worked (set-up, not an attack); raises if not."""
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(result.args[2:5])}... exited {result.returncode}: {result.stderr[-800:]}")
    return result


def serve_flags() -> str:
    """The help of `prunefleet cloud serve`: which flags this cloud has (some attacks use newer ones)."""
    return checked(cli("cloud", "serve", "--help")).stdout


class Arena:
    """Certificates, two stores under the portfolio root ("base", served; "next", to deploy), the arena's
    cloud, and every process and channel the attacks opened (`close`)."""

    def __init__(self, work: Path, quick: bool):
        shutil.rmtree(work, ignore_errors=True)
        self.work, self.quick, self.logs = work, quick, work / "logs"
        self.certs = work / "certs"
        checked(cli("certs", "init", str(self.certs)))
        for name in EDGES:
            checked(cli("certs", "issue", "edge", name, "--certs-dir", str(self.certs)))
        checked(cli("certs", "issue", "client", CLIENT, "--certs-dir", str(self.certs)))
        self.flags = serve_flags()
        self.root = work / "portfolios"  # --portfolio-root, where the cloud has one
        self.stores = {
            "base": write_store(self.root / "base", [variant_bytes(0.125), variant_bytes(0.0625)]).root,
            "next": write_store(self.root / "next", [variant_bytes(0.125), variant_bytes(0.03125)]).root,
        }
        self.children: list[processes.Child] = []
        self._channels: list[grpc.Channel] = []
        self._edge: processes.Child | None = None
        flags = ["--max-rpcs", str(MAX_RPCS), "--workers", "8"]
        self.bind_timeout_s = DEFAULT_BIND_TIMEOUT_S
        if "--bind-timeout" in self.flags:
            flags, self.bind_timeout_s = [*flags, "--bind-timeout", str(BIND_TIMEOUT_S)], BIND_TIMEOUT_S
        self.cloud = self.start_cloud("cloud", self.holder("cloud"), flags)

    # --- certificates ----------------------------------------------------------------------------------
    def holder(self, who: str) -> Path:
        """The directory of a role ("cloud", "operator") or of an edge or client by name."""
        if who in ("cloud", "operator", "ca"):
            return self.certs / who
        if who == CLIENT or who == "default":
            return self.certs / "clients" / who
        return self.certs / "edges" / who

    def transport(self, who: str, token: bool = False) -> Transport:
        return Transport.load(self.holder(who), token=token)

    def channel(self, who: str, address: str | None = None, token: bool = False) -> grpc.Channel:
        channel = self.transport(who, token).channel(address or self.cloud.address)
        self._channels.append(channel)
        return channel

    def coordinator(self, who: str, address: str | None = None, token: bool = False):
        return coordinator_pb2_grpc.CoordinatorServiceStub(self.channel(who, address, token))

    def portfolio(self, who: str, address: str | None = None):
        return portfolio_pb2_grpc.PortfolioServiceStub(self.channel(who, address))

    def inference(self, who: str, address: str):
        """An edge's InferenceService called with `who`'s certificate, as tools call edges (no token)."""
        channel = self.transport(who).for_edges().channel(address)
        self._channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    @property
    def operator(self):
        return self.coordinator("operator", token=True)

    def register(self, edge: str, address: str = "127.0.0.1:1") -> None:
        """`edge` registers under its own certificate (what a real agent does first)."""
        self.coordinator(edge).Register(coordinator_pb2.RegisterRequest(edge=edge, address=address), timeout=RPC_S)

    # --- processes -------------------------------------------------------------------------------------
    def cloud_args(self, name: str, certs: Path, extra: list[str]) -> list[str]:
        args = commands.cloud_args(self.stores["base"], db=self.work / f"{name}.sqlite", certs=certs)
        if "--portfolio-root" in self.flags:
            args += ["--portfolio-root", str(self.root)]
        return [*args, *extra]

    def start_cloud(self, name: str, certs: Path, extra: list[str] = ()) -> processes.Child:
        child = processes.start(name, self.cloud_args(name, certs, list(extra)), self.logs)
        self.children.append(child)
        return child

    def start_edge(self, name: str, cache: Path, cloud: str | None = None, timeout_s: float = 120.0):
        args = commands.edge_args(
            cloud or self.cloud.address, name, cache=cache, certs=self.holder(name), threads=1, batch=2
        )
        child = processes.start(name, args, self.logs, timeout_s=timeout_s)
        self.children.append(child)
        return child

    def edge(self) -> processes.Child:
        """The arena's real edge agent, edge-c, started on first use (its cache: WORK/cache/edge-c)."""
        if self._edge is None or self._edge.process.poll() is not None:
            self._edge = self.start_edge("edge-c", self.edge_cache)
        return self._edge

    @property
    def edge_cache(self) -> Path:
        return self.work / "cache" / "edge-c"

    def stop(self, child: processes.Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        processes.stop_all(self.children)
        self.children = []
