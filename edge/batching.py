"""Micro-batching: requests that arrive close together run as one forward pass, within a latency bound.

A request is validated in its own thread (a bad one fails alone, at once), then queued. A worker takes
the oldest request and waits for more until the batch holds `max_batch` samples or the oldest request
has waited `max_delay_ms`, whichever comes first; then it reads the active variant once and runs the
whole batch on it, so every request of a batch is answered by the same variant, and a switch meanwhile
applies to the next batch. `workers` batches run at once (the runtime's slots bound inference anyway).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from common.wire import TensorError
from edge.runtime import Runtime


@dataclass(frozen=True)
class BatchConfig:
    max_delay_ms: float  # longest the oldest request of a batch waits for others
    max_batch: int = 64  # samples in one forward pass
    workers: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.max_delay_ms <= 1000 or self.max_batch < 1 or self.workers < 1:
            raise ValueError("max_delay_ms must be in (0, 1000], max_batch and workers >= 1")


@dataclass(frozen=True)
class _Pending:
    x: np.ndarray  # validated: float32 in [0, 1]
    arrived: float
    answer: Future


class MicroBatcher:
    def __init__(
        self,
        runtime: Runtime,
        config: BatchConfig,
        on_batch: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._runtime, self.config, self._clock = runtime, config, clock
        self._on_batch = on_batch or (lambda requests: None)
        self._queue: deque[_Pending] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, daemon=True, name=f"batch-{i}") for i in range(config.workers)
        ]
        for worker in self._workers:
            worker.start()

    def expected_input(self) -> str:
        return self._runtime.expected_input()

    def predict(self, array: np.ndarray) -> tuple[np.ndarray, str]:
        """Like `Runtime.predict`, answered from a shared batch."""
        x, _ = self._runtime.validate(array)
        pending = _Pending(x, self._clock(), Future())
        with self._ready:
            if self._stopping:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self._ready.notify()
        return pending.answer.result()

    def _take(self) -> list[_Pending]:
        """The next batch: wait for a request, then for more until full or the oldest is due."""
        with self._ready:
            while not self._queue and not self._stopping:
                self._ready.wait()
            if not self._queue:
                return []
            due = self._queue[0].arrived + self.config.max_delay_ms / 1e3
            while sum(len(p.x) for p in self._queue) < self.config.max_batch and not self._stopping:
                left = due - self._clock()
                if left <= 0:
                    break
                self._ready.wait(left)
            first = self._queue.popleft()
            batch, samples = [first], len(first.x)
            while self._queue and samples + len(self._queue[0].x) <= self.config.max_batch:
                samples += len(self._queue[0].x)
                batch.append(self._queue.popleft())
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        variant = self._runtime.active
        shape = tuple(variant.spec.input_shape)
        fitting = [p for p in batch if tuple(p.x.shape[1:]) == shape]
        for p in batch:
            if tuple(p.x.shape[1:]) != shape:  # a portfolio whose variants take other inputs
                p.answer.set_exception(TensorError(f"the variant now active takes [N, {', '.join(map(str, shape))}]"))
        if not fitting:
            return
        try:
            xs = [p.x for p in fitting]
            logits = self._runtime.run(variant, xs[0] if len(xs) == 1 else np.concatenate(xs))
        except Exception as err:
            for p in fitting:
                p.answer.set_exception(err)
            return
        offset = 0
        for p in fitting:
            p.answer.set_result((logits[offset : offset + len(p.x)], variant.variant_id))
            offset += len(p.x)
        self._on_batch(len(fitting))

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self._run(batch)

    def close(self) -> None:
        """Answer what is queued, then stop the workers."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join(timeout=5.0)
