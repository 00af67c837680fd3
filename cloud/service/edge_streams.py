"""The edges' open `Connect` streams: what goes down each one, and which edge each is bound to.

A stream's coroutine reads its `Outbox` on the cloud's event loop; anything else (operator RPCs in
the thread pool, the rollout judge) puts directives into it from its own thread. A stream is bound
to an edge by the edge's first report; until then it has no edge and gets no pushes.

One stream per edge: a stream opened by an edge's certificate (its `owner`) replaces every older
stream of the same certificate, and a stream bound to an edge replaces every older one bound to it.
The newer wins because an edge that reconnects after a broken link must not wait for the cloud to
notice the old stream is dead; the replaced stream ends with `REPLACED` (ABORTED).

Each stream's reports are read at its identity's pace (`cloud.service.report_pace`): `paced` waits for
the next one's turn.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc

from cloud.service.report_pace import ReportPace

CLOSE = object()  # put into an outbox: the stream ends
REPLACED = (grpc.StatusCode.ABORTED, "replaced by a newer Connect stream of the same edge")


class Outbox:
    """What goes down one edge's stream: filled from any thread, read by the stream's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server has stopped, the stream with it
            pass

    async def get(self):
        return await self._queue.get()


class EdgeStreams:
    """Every open stream by id, with the edge it is bound to ('' until its first report) and the
    certificate name that opened it ('' in plaintext); thread-safe."""

    def __init__(self, pace: ReportPace | None = None):
        self._pace = ReportPace() if pace is None else pace  # (an empty one has length 0)
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[str, Outbox]] = {}
        self._owners: dict[int, str] = {}

    def _replace(self, stream_id: int, same) -> None:
        """End every other stream for which `same(id)` holds (called with the lock held)."""
        for other in [i for i in self._streams if i != stream_id and same(i)]:
            self._streams.pop(other)[1].put(REPLACED)
            self._owners.pop(other, None)

    def open(self, outbox: Outbox, owner: str = "") -> int:
        stream_id = id(outbox)
        with self._lock:
            self._streams[stream_id] = ("", outbox)
            if owner:
                self._owners[stream_id] = owner
                self._replace(stream_id, lambda other: self._owners.get(other) == owner)
        return stream_id

    async def paced(self, identity: str) -> None:
        """Wait until the next report of `identity` may be read (at once while under its rate)."""
        if wait := self._pace.delay(identity):
            await asyncio.sleep(wait)

    def close(self, stream_id: int) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)
            self._owners.pop(stream_id, None)

    def end_owned_by(self, owners: set[str], item) -> None:
        """End every stream opened by one of these certificate names with `item` (code, message)."""
        with self._lock:
            for stream_id in [i for i, owner in self._owners.items() if owner in owners]:
                self._streams.pop(stream_id)[1].put(item)
                self._owners.pop(stream_id)

    def bound_edge(self, stream_id: int) -> str:
        """The edge the stream is bound to, or '' (not bound yet, or closed)."""
        with self._lock:
            return self._streams.get(stream_id, ("",))[0]

    def bind(self, stream_id: int, edge: str) -> Outbox | None:
        """Bind the stream to `edge`; its outbox, or None when the stream has closed meanwhile."""
        with self._lock:
            if stream_id not in self._streams:
                return None
            outbox = self._streams[stream_id][1]
            self._streams[stream_id] = (edge, outbox)
            self._replace(stream_id, lambda other: self._streams[other][0] == edge)
            return outbox

    def to(self, edge: str) -> Iterator[Outbox]:
        """The outboxes of the streams bound to `edge`."""
        with self._lock:
            outboxes = [outbox for bound, outbox in self._streams.values() if bound == edge]
        yield from outboxes

    def all(self) -> list[tuple[str, Outbox]]:
        with self._lock:
            return list(self._streams.values())

    def connected(self) -> set[str]:
        """The edges with a bound stream."""
        with self._lock:
            return {edge for edge, _ in self._streams.values() if edge}

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)
