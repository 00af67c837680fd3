"""`prunefleet bench transfer`: how fast variants reach edges, against raw TCP, in one run.

    grpc / tls    one variant of VARIANT_MIB streamed with FetchVariant from a real cloud process
                  (`prunefleet cloud serve`, plaintext with --insecure, then mutual TLS); the client
                  reads every chunk as the edge does (`edge.fetcher.portfolio_stub`: its data a view
                  of the message) and drops it (transport only: no disk, no hash)
    raw_tcp       the same file's bytes from a process that reads it in the same chunk size and writes
                  them to a loopback TCP socket; the client receives and drops them. Plaintext gRPC
                  and raw TCP transfers alternate, round by round
    resume        the edge fetcher's own path, through a counting TCP proxy: a download into
                  CACHE/<id>.part is cut at half the transfer and `edge.fetcher.fetch` resumes it.
                  The cut is the link's: it dies at half the bytes, stays dead a second and is
                  reset. `resume_resent_bytes` is the file bytes that crossed the link twice, read
                  from the bytes the proxy let through before the cut (`bench.net.h2wire`);
                  `resume_wire_extra_bytes` is every cloud-to-edge byte of the cut and resumed calls
                  beyond one uncut transfer's (framing, the new connection and call included).
                  Beside them, the edge cancelling its own call (`resume_cancel_wire_extra_bytes`),
                  which also loses what gRPC held for it. See `bench.suites.transfer_resume`
    fanout        EDGES separate processes, each an edge fetcher with its own cache and the edge
                  certificate, fetch and verify the whole portfolio from the TLS cloud at once; the time
                  from the start signal until the last one holds every file

The payload is random bytes (incompressible, and the transfer path never parses a variant file).
Throughputs are MB/s (10^6 bytes), the median of `repeats` transfers. The gRPC and raw-TCP transfers
are in `bench.suites.transfer_parts`, the resume scenario in `bench.suites.transfer_resume`; this
module holds the payload store, the fan-out and the suite itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import shutil
import statistics
import time
from pathlib import Path

from bench.suites.transfer_parts import paired_seconds, stream_seconds
from bench.suites.transfer_resume import resume
from cloud.admin import certs
from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from cloud.localfleet import commands, processes
from common.security import Transport
from common.wire import CHUNK_BYTES
from edge.fetcher import RetryConfig, fetch, portfolio_stub
from protos import portfolio_pb2

log = logging.getLogger(__name__)
MiB = 1 << 20
FULL = {"variant_mib": 64, "others_mib": (4, 4, 4), "repeats": 9, "edges": 8}
QUICK = {"variant_mib": 16, "others_mib": (2,), "repeats": 3, "edges": 8}
TARGETS = {"grpc_vs_raw": 0.35, "resume_resent_bytes": CHUNK_BYTES}


# --- the store -------------------------------------------------------------------------------------------
def make_store(root: Path, variant_mib: int, others_mib: tuple[int, ...], seed: int = 0) -> PortfolioStore:
    """A portfolio of random-byte variant files: the big one first."""
    store = PortfolioStore(root)
    if store.exists():
        return store
    rng = random.Random(seed)
    entries = []
    for level, mib in enumerate((variant_mib, *others_mib)):
        vid = store.put_variant(rng.randbytes(mib * MiB))
        entries.append(
            VariantEntry(
                vid,
                f"payload-{mib}MiB-{level}",
                level,
                "dense",
                "vgg11",
                0,
                mib * MiB,
                0.0,
                0.0,
                0.0,
                1.0,
                1.0,
                0.0,
                0.0,
            )
        )
    store.write_manifest(
        Manifest(
            portfolio_id([e.variant_id for e in entries]), "payload", "none", "dense", time.time(), {}, tuple(entries)
        )
    )
    return store


def start_cloud(store: PortfolioStore, work: Path, name: str, certs: Path | None) -> processes.Child:
    """A cloud serving `store` with metrics, speaking mutual TLS with `certs` or plaintext without."""
    args = commands.cloud_args(store.root, db=work / f"{name}.sqlite", certs=certs, metrics_port=0)
    return processes.start(name, args, work / "logs")


def mb_s(size: int, seconds: list[float]) -> float:
    return size / 1e6 / statistics.median(seconds)


# --- fan-out ---------------------------------------------------------------------------------------------
def _edge(certs_dir: str, address: str, variant_ids: list[str], cache: str, ready, go, done) -> None:
    transport = Transport.load(Path(certs_dir))
    channel = transport.channel(address)
    stub = portfolio_stub(channel)
    stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=60)  # connected and handshaken
    ready.release()
    go.wait()
    for variant_id in variant_ids:
        fetch(stub, variant_id, Path(cache), retry=RetryConfig(attempts=3, backoff_s=0.1))
    done.put(time.time())


def fanout(address: str, edge_certs: Path, variant_ids: list[str], work: Path, edges: int) -> float:
    context = multiprocessing.get_context("spawn")
    ready, go, done = context.Semaphore(0), context.Event(), context.Queue()
    children = [
        context.Process(
            target=_edge,
            args=(str(edge_certs), address, variant_ids, str(work / "fanout" / f"edge-{i}"), ready, go, done),
        )
        for i in range(edges)
    ]
    for child in children:
        child.start()
    for _ in children:
        if not ready.acquire(timeout=300):
            raise RuntimeError("an edge process did not connect")
    start = time.time()
    go.set()
    finished = [done.get(timeout=600) for _ in children]
    for child in children:
        child.join(30)
    if any(child.exitcode != 0 for child in children):
        raise RuntimeError("an edge process failed")
    return max(finished) - start


# --- the suite -------------------------------------------------------------------------------------------
def measure(plan: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("resume", "fanout"):  # edge caches of an earlier run would answer without a transfer
        shutil.rmtree(work / stale, ignore_errors=True)
    store = make_store(work / "store", plan["variant_mib"], tuple(plan["others_mib"]))
    big = store.manifest().variants[0]
    size, path = big.size_bytes, store.variant_path(big.variant_id)
    keys = certs.init(work / "certs", force=True)
    operator = Transport.load(keys["operator"], token=True)
    out: dict = {"plan": plan, "variant_bytes": size, "chunk_bytes": CHUNK_BYTES}
    plain = start_cloud(store, work, "cloud-plain", None)
    try:
        channel = Transport.plaintext().channel(plain.address)
        out["grpc_seconds"], out["raw_tcp_seconds"] = paired_seconds(
            channel, big.variant_id, path, size, plan["repeats"]
        )
        channel.close()
        out["resume"] = resume(plain, Transport.plaintext(), big.variant_id, size, work / "resume" / "cache")
    finally:
        plain.stop()
    tls = start_cloud(store, work, "cloud-tls", keys["cloud"])
    try:
        channel = operator.channel(tls.address)
        out["tls_seconds"] = [stream_seconds(channel, big.variant_id, size) for _ in range(plan["repeats"])]
        channel.close()
        variants = store.manifest().variants
        out["fanout"] = {
            "edges": plan["edges"],
            "portfolio_bytes": sum(v.size_bytes for v in variants),
            "seconds": fanout(tls.address, keys["edge"], [v.variant_id for v in variants], work, plan["edges"]),
        }
    finally:
        tls.stop()
    return out


def summarize(out: dict) -> dict:
    size = out["variant_bytes"]
    grpc_mb_s, raw = mb_s(size, out["grpc_seconds"]), mb_s(size, out["raw_tcp_seconds"])
    summary = {
        "grpc_mb_s": round(grpc_mb_s, 1),
        "tls_mb_s": round(mb_s(size, out["tls_seconds"]), 1),
        "raw_tcp_mb_s": round(raw, 1),
        "grpc_vs_raw": round(grpc_mb_s / raw, 3),
        "resume_resent_bytes": out["resume"]["link"]["file_resent_bytes"],
        "resume_wire_extra_bytes": out["resume"]["link"]["wire_extra_bytes"],
        "resume_cancel_wire_extra_bytes": out["resume"]["cancel"]["wire_extra_bytes"],
        "fanout_8_s": round(out["fanout"]["seconds"], 2),
    }
    summary["targets"] = {
        "grpc_vs_raw >= 0.35": summary["grpc_vs_raw"] >= TARGETS["grpc_vs_raw"],
        "resume_resent_bytes <= one chunk": summary["resume_resent_bytes"] <= TARGETS["resume_resent_bytes"],
    }
    return summary


def run(quick: bool, data_dir: Path | None, work: Path, plan: dict | None = None) -> dict:
    """`data_dir` is unused: the payload is random bytes."""
    plan = plan or (QUICK if quick else FULL)
    out = measure(plan, work)
    return {**out, "summary": summarize(out)}
