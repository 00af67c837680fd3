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
                  from the bytes the proxy let through before the cut (`bench.h2wire`);
                  `resume_wire_extra_bytes` is every cloud-to-edge byte of the cut and resumed calls
                  beyond one uncut transfer's (framing, the new connection and call included).
                  Beside them, the edge cancelling its own call (`resume_cancel_wire_extra_bytes`),
                  which also loses what gRPC held for it. See `resume`
    fanout        EDGES separate processes, each an edge fetcher with its own cache and the edge
                  certificate, fetch and verify the whole portfolio from the TLS cloud at once; the time
                  from the start signal until the last one holds every file

The payload is random bytes (incompressible, and the transfer path never parses a variant file).
Throughputs are MB/s (10^6 bytes), the median of `repeats` transfers.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import re
import shutil
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from bench.net.h2wire import Crossed, crossed_chunks, file_bytes_in
from bench.net.tcp_proxy import TcpProxy
from cloud.admin import certs
from cloud.build.store import Manifest, PortfolioStore, VariantEntry, portfolio_id
from cloud.localfleet import processes
from common.security import Transport
from common.wire import CHUNK_BYTES
from edge.fetcher import RetryConfig, cached_path, fetch, portfolio_stub
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


def start_cloud(store: PortfolioStore, work: Path, name: str, security: list[str]) -> processes.Child:
    return processes.start(
        name,
        [
            "cloud.cli",
            "cloud",
            "serve",
            "--store",
            str(store.root),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--db",
            str(work / f"{name}.sqlite"),
            *security,
        ],
        work / "logs",
    )


# --- one stream ------------------------------------------------------------------------------------------
def stream_seconds(channel, variant_id: str, size: int) -> float:
    stub = portfolio_stub(channel)
    start, received = time.perf_counter(), 0
    for chunk in stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id=variant_id), timeout=300):
        received += len(chunk.data)
    elapsed = time.perf_counter() - start
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    return elapsed


def _raw_server(path: str, ports, repeats: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    for _ in range(repeats):
        connection, _ = listener.accept()
        with connection, open(path, "rb") as f:
            while data := f.read(CHUNK_BYTES):
                connection.sendall(data)


class RawSender:
    """A process that serves the file `repeats` times over raw loopback TCP, one connection each."""

    def __init__(self, path: Path, repeats: int):
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self._process = context.Process(target=_raw_server, args=(str(path), ports, repeats))
        self._process.start()
        self._port = ports.get(timeout=120)
        self._buffer = bytearray(CHUNK_BYTES)

    def seconds(self, size: int) -> float:
        """One transfer, timed from connect to the last byte."""
        start, received = time.perf_counter(), 0
        with socket.create_connection(("127.0.0.1", self._port)) as connection:
            while received < size and (n := connection.recv_into(self._buffer)):
                received += n
        elapsed = time.perf_counter() - start
        if received != size:
            raise RuntimeError(f"raw TCP received {received} of {size} bytes")
        return elapsed

    def close(self) -> None:
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def paired_seconds(channel, variant_id: str, path: Path, size: int, repeats: int) -> tuple[list, list]:
    """gRPC and raw TCP transfers in alternating rounds, so a change in the machine's speed during the
    run reaches both alike."""
    raw = RawSender(path, repeats)
    grpc_times, raw_times = [], []
    try:
        for _ in range(repeats):
            grpc_times.append(stream_seconds(channel, variant_id, size))
            raw_times.append(raw.seconds(size))
    finally:
        raw.close()
    return grpc_times, raw_times


def mb_s(size: int, seconds: list[float]) -> float:
    return size / 1e6 / statistics.median(seconds)


# --- resume ----------------------------------------------------------------------------------------------
def bytes_sent(metrics_address: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return float(re.search(r"^prunefleet_cloud_variant_bytes_sent_total (\S+)$", text, re.M).group(1))


def _cut_download(stub, variant_id: str, part: Path, size: int) -> int:
    """Download into `part` until at least half the file is on disk, then cancel the call."""
    call = stub.FetchVariant(portfolio_pb2.FetchVariantRequest(variant_id=variant_id), timeout=300)
    with open(part, "wb") as f:
        for chunk in call:
            f.write(chunk.data)
            if f.tell() >= size // 2:
                call.cancel()
                break
    return part.stat().st_size


def _link_cut_resume(
    proxy: TcpProxy, stub, variant_id: str, cache: Path, at_bytes: int, hold_s: float
) -> tuple[int, list[Crossed]]:
    """Let `edge.fetcher.fetch` download through the proxy, cut the link once `at_bytes` have gone down,
    hold the cut for `hold_s`, then reset the connection; the fetcher's own retry resumes. The size of
    the .part file when the link came back, and the chunks that had started to cross before the cut."""
    proxy.cut_after(at_bytes, record=True)
    done: dict = {}

    def download() -> None:
        try:
            done["path"] = fetch(
                stub, variant_id, cache, retry=RetryConfig(attempts=3, backoff_s=0.2, max_backoff_s=1.0)
            )
        except Exception as err:  # reported by the caller, which is waiting on this thread
            done["error"] = err

    thread = threading.Thread(target=download, name="link-cut-fetch")
    thread.start()
    deadline = time.monotonic() + 120
    while not proxy.is_cut and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not proxy.is_cut:
        thread.join(300)
        raise RuntimeError(f"the download was not cut: {done}")
    time.sleep(hold_s)  # the link is dead: what reached the edge is written, the rest waits
    part = cache / f"{variant_id}.part"
    kept = part.stat().st_size if part.exists() else 0
    crossed = crossed_chunks(bytes(proxy.recorded))
    proxy.restore()  # the held connection is reset; the next attempt connects again
    thread.join(300)
    if "error" in done or thread.is_alive():
        raise RuntimeError(f"the resumed download did not finish: {done.get('error')}")
    return kept, crossed


def _cancel_resume(stub, variant_id: str, cache: Path, size: int) -> int:
    """Cancel a download once half the file is on disk, then resume it with `edge.fetcher.fetch`: an edge
    that drops its own stream. The size of the .part file at the cancel."""
    cut_at = _cut_download(stub, variant_id, cache / f"{variant_id}.part", size)
    time.sleep(0.5)  # let the cloud notice the cancellation before the resume starts
    fetch(stub, variant_id, cache, retry=RetryConfig(attempts=1))
    return cut_at


def resume(
    cloud: processes.Child, transport: Transport, variant_id: str, size: int, cache: Path, hold_s: float = 1.0
) -> dict:
    """Cut downloads at half the file and resume them with the edge fetcher; the bytes that crossed twice.

    Every call goes through a TCP proxy that counts the bytes it forwards from the cloud. An uncut
    download of the file through it first gives the wire cost of one transfer (framing included). Two
    cuts:

        link     the link dies at half the transfer's bytes (`TcpProxy.cut_after`), stays dead for
                 `hold_s`, and the connection is reset; the fetcher retries and resumes from its .part
                 file. The proxy keeps what it let through, so the file bytes of the chunks that
                 crossed are known. gRPC hands the edge only whole messages: a chunk the cut broke is
                 sent again from its start, and its bytes that had crossed are the file bytes sent
                 twice (`file_resent_bytes`, less than one chunk). A link that dies within the last
                 bytes of a chunk makes that chunk's framing and the new call's headers cost more than
                 one chunk on the wire (`wire_extra_bytes`): half the transfer's bytes falls within a
                 few hundred bytes of the end of the middle chunk, so either can happen here
        cancel   the edge cancels its own call once half the file is on disk and fetches again. What
                 gRPC had received for it but not handed over is lost with the call: up to the next
                 chunk and the channel's read-ahead (`wire_extra_bytes`)

    The cloud's own counter (bytes of the chunks gRPC took from it) is reported beside each."""
    proxy = TcpProxy(int(cloud.address.rsplit(":", 1)[1]))
    channel = transport.channel(f"127.0.0.1:{proxy.port}")
    stub = portfolio_stub(channel)
    out: dict = {}
    try:
        stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=60)  # the connection's own bytes
        start = proxy.bytes_down
        stream_seconds(channel, variant_id, size)
        time.sleep(0.5)
        one_transfer = proxy.bytes_down - start
        out["wire_one_transfer_bytes"] = one_transfer
        for name in ("cancel", "link"):
            where = cache / name
            where.mkdir(parents=True, exist_ok=True)
            wire_before, counted = proxy.bytes_down, bytes_sent(cloud.metrics_address)
            crossed = None
            if name == "cancel":
                kept = _cancel_resume(stub, variant_id, where, size)
            else:
                kept, crossed = _link_cut_resume(proxy, stub, variant_id, where, one_transfer // 2, hold_s)
            time.sleep(0.5)
            wire = proxy.bytes_down - wire_before
            cloud_sent = bytes_sent(cloud.metrics_address) - counted
            final = cached_path(where, variant_id)
            out[name] = {
                "cut_at_bytes": kept,
                "wire_cut_and_resume_bytes": wire,
                "wire_extra_bytes": wire - one_transfer,
                "cloud_sent_bytes": int(cloud_sent),
                "cloud_resent_bytes": int(cloud_sent - size),
                "verified": final.is_file() and final.stat().st_size == size,
            }
            if crossed is not None:  # the resumed call sent the file again from `kept` on
                out[name].update(
                    file_bytes_crossed_before_cut=file_bytes_in(crossed, 0, size),
                    whole_chunks_crossed=sum(c.whole for c in crossed),
                    cut_chunk=next(
                        ({"offset": c.offset, "data_bytes_crossed": c.data_bytes} for c in crossed if not c.whole), None
                    ),
                    file_resent_bytes=file_bytes_in(crossed, kept, size),
                )
    finally:
        channel.close()
        proxy.close()
    return out


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
    plain = start_cloud(store, work, "cloud-plain", ["--insecure"])
    try:
        channel = Transport.plaintext().channel(plain.address)
        out["grpc_seconds"], out["raw_tcp_seconds"] = paired_seconds(
            channel, big.variant_id, path, size, plan["repeats"]
        )
        channel.close()
        out["resume"] = resume(plain, Transport.plaintext(), big.variant_id, size, work / "resume" / "cache")
    finally:
        plain.stop()
    tls = start_cloud(store, work, "cloud-tls", ["--certs", str(keys["cloud"])])
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
