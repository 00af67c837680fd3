"""The resume scenario of the transfer suite: downloads cut at half the file and resumed by the edge
fetcher, and the bytes that crossed the link twice.

Every call goes through a TCP proxy (`bench.net.tcp_proxy`) that counts the bytes it forwards from
the cloud, so a resumed download is told apart from one that started over, and what a cut costs is
read from the link itself rather than from either peer's account.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.net.h2wire import Crossed, crossed_chunks, file_bytes_in
from bench.net.tcp_proxy import TcpProxy
from bench.suites.transfer_parts import stream_seconds
from cloud.localfleet import processes
from common.security import Transport
from edge.fetcher import RetryConfig, cached_path, fetch, portfolio_stub
from protos import portfolio_pb2


def bytes_sent(metrics_address: str) -> float:
    """The cloud's own count of variant bytes sent: the chunks gRPC took from it."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return float(re.search(r"^prunefleet_cloud_variant_bytes_sent_total (\S+)$", text, re.M).group(1))


@dataclass(frozen=True)
class _Proxied:
    """One variant's downloads through the counting proxy: what every cut and resume shares."""

    proxy: TcpProxy
    stub: object
    metrics_address: str
    variant_id: str
    size: int


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


def _wire_one_transfer(at: _Proxied, channel) -> int:
    """The cloud-to-edge bytes of one uncut download through the proxy, framing included (the
    connection's own set-up is done and left out first)."""
    at.stub.ListVariants(portfolio_pb2.ListVariantsRequest(), timeout=60)  # the connection's own bytes
    start = at.proxy.bytes_down
    stream_seconds(channel, at.variant_id, at.size)
    time.sleep(0.5)
    return at.proxy.bytes_down - start


def _crossed_before_cut(crossed: list[Crossed], kept: int, size: int) -> dict:
    """What of the file had crossed the link when it broke; the resumed call sent it again from `kept` on."""
    return {
        "file_bytes_crossed_before_cut": file_bytes_in(crossed, 0, size),
        "whole_chunks_crossed": sum(c.whole for c in crossed),
        "cut_chunk": next(
            ({"offset": c.offset, "data_bytes_crossed": c.data_bytes} for c in crossed if not c.whole), None
        ),
        "file_resent_bytes": file_bytes_in(crossed, kept, size),
    }


def _cut_and_resume(at: _Proxied, name: str, where: Path, one_transfer: int, hold_s: float) -> dict:
    """One cut (`link` or `cancel`) and its resumed download into `where`, counted on the wire and by
    the cloud, against one uncut transfer's wire bytes."""
    where.mkdir(parents=True, exist_ok=True)
    wire_before, counted = at.proxy.bytes_down, bytes_sent(at.metrics_address)
    crossed = None
    if name == "cancel":
        kept = _cancel_resume(at.stub, at.variant_id, where, at.size)
    else:
        kept, crossed = _link_cut_resume(at.proxy, at.stub, at.variant_id, where, one_transfer // 2, hold_s)
    time.sleep(0.5)
    wire = at.proxy.bytes_down - wire_before
    cloud_sent = bytes_sent(at.metrics_address) - counted
    final = cached_path(where, at.variant_id)
    out = {
        "cut_at_bytes": kept,
        "wire_cut_and_resume_bytes": wire,
        "wire_extra_bytes": wire - one_transfer,
        "cloud_sent_bytes": int(cloud_sent),
        "cloud_resent_bytes": int(cloud_sent - at.size),
        "verified": final.is_file() and final.stat().st_size == at.size,
    }
    if crossed is not None:
        out.update(_crossed_before_cut(crossed, kept, at.size))
    return out


def resume(
    cloud: processes.Child, transport: Transport, variant_id: str, size: int, cache: Path, hold_s: float = 1.0
) -> dict:
    """Cut downloads at half the file and resume them with the edge fetcher; the bytes that crossed twice.

    An uncut download of the file through the proxy first gives the wire cost of one transfer (framing
    included). Two cuts:

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
    at = _Proxied(proxy, portfolio_stub(channel), cloud.metrics_address, variant_id, size)
    try:
        one_transfer = _wire_one_transfer(at, channel)
        out: dict = {"wire_one_transfer_bytes": one_transfer}
        for name in ("cancel", "link"):
            out[name] = _cut_and_resume(at, name, cache / name, one_transfer, hold_s)
    finally:
        channel.close()
        proxy.close()
    return out
