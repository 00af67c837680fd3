"""A TCP proxy that stands for an edge's network link: open, slowed down, or cut.

    open       bytes cross as they come
    throttle   bytes cross at most `rate` bytes per second in each direction (a slow link)
    cut        nothing crosses: the proxy stops reading, so the peers' buffers fill and no byte or
               acknowledgement gets through; connections opened during the cut are accepted and hang.
               When the cut ends, every connection that was open during it is reset (a stream that
               lost its link for that long cannot carry on); new connections work again.
               `cut_after(n)` makes the cut begin once exactly n more bytes have gone down, and can
               keep a copy of those bytes (`recorded`).

It counts the bytes it forwarded in each direction, so a benchmark can tell a resumed download from
one that started over. Everything runs on threads of the calling process.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

PIECE = 16 << 10
POLL_S = 0.1


class _Pair:
    """One proxied connection: the client's socket and the upstream one."""

    def __init__(self, client: socket.socket):
        self.client, self.upstream = client, None
        self.closed = threading.Event()

    def close(self, reset: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                if reset:  # RST instead of FIN: whatever was queued is thrown away
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", host: str = "127.0.0.1"):
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._cut = threading.Event()
        self._stopping = threading.Event()
        self.rate = 0.0  # bytes per second per direction; 0 = no limit
        self.bytes_down = 0  # upstream -> client
        self.bytes_up = 0
        self._cut_at: int | None = None  # bytes_down at which the cut begins
        self.recorded: bytearray | None = None  # bytes forwarded down before the cut, if asked for
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    # --- modes -----------------------------------------------------------------------------------------
    def throttle(self, rate_bytes_s: float) -> None:
        self.rate = float(rate_bytes_s)

    def open(self) -> None:
        """No limit and no cut (resets the connections a cut held, if one was in force)."""
        self.rate = 0.0
        self.restore()

    def cut(self) -> None:
        self._cut.set()

    def cut_after(self, down_bytes: int, record: bool = False) -> None:
        """Cut the link once exactly `down_bytes` more bytes have been forwarded to the client: a
        transfer cut at a chosen point of its stream, whatever sizes the peers write in. With `record`,
        those bytes are kept in `recorded` (at most `down_bytes` of them)."""
        if down_bytes < 0:
            raise ValueError("down_bytes must be >= 0")
        with self._lock:
            self._cut_at = self.bytes_down + down_bytes
            self.recorded = bytearray() if record else None

    def restore(self) -> None:
        if not self._cut.is_set():
            return
        with self._lock:
            held = list(self._pairs)
        for pair in held:
            pair.close(reset=True)
        self._cut.clear()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()

    # --- forwarding ------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            pair = _Pair(client)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._connect, args=(pair,), daemon=True).start()

    def _connect(self, pair: _Pair) -> None:
        while self._cut.is_set() and not pair.closed.is_set():
            time.sleep(POLL_S)  # a connection made during a cut hangs until the cut ends (and is reset then)
        try:
            if not pair.closed.is_set():
                pair.upstream = socket.create_connection(self._upstream, timeout=10)
                pair.upstream.settimeout(None)
        except OSError:
            pass
        if pair.upstream is None or pair.closed.is_set():
            self._forget(pair)
            return
        threading.Thread(target=self._pump, args=(pair, pair.upstream, pair.client, "down"), daemon=True).start()
        self._pump(pair, pair.client, pair.upstream, "up")

    def _forget(self, pair: _Pair) -> None:
        pair.close()
        with self._lock:
            self._pairs.discard(pair)

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket, direction: str) -> None:
        try:
            while not pair.closed.is_set():
                if self._cut.is_set():
                    time.sleep(POLL_S)  # nothing is read, so nothing crosses and nothing is acknowledged
                    continue
                if not select.select([source], [], [], POLL_S)[0]:
                    continue
                data = source.recv(PIECE if self.rate else 1 << 20)
                if not data:
                    break
                self._forward(target, data, direction)
        except OSError:
            pass
        finally:
            self._forget(pair)

    def _forward(self, target: socket.socket, data: bytes, direction: str) -> None:
        started = time.monotonic()
        if self._cut.is_set():  # read just as the cut began: dropped, and the connection is reset later
            return
        with self._lock:  # counted as they are handed on
            if direction == "down":
                cut = self._cut_at is not None and self.bytes_down + len(data) >= self._cut_at
                if cut:
                    data = data[: self._cut_at - self.bytes_down]  # the rest is dropped with the cut
                if self._cut_at is not None and self.recorded is not None:
                    self.recorded += data
                if cut:
                    self._cut_at = None
                    self._cut.set()
                self.bytes_down += len(data)
            else:
                self.bytes_up += len(data)
        target.sendall(data)
        if self.rate:
            time.sleep(max(0.0, len(data) / self.rate - (time.monotonic() - started)))
