"""The runtime: variants in memory, one active reference, switching by reference swap.

A request reads the active reference once and finishes on that variant, whatever switches happen
meanwhile; new requests see the new reference. A switch to a resident variant is one assignment under
a lock, so it takes microseconds and never fails a request. A semaphore sized to the device (`slots`)
bounds concurrent inference, so time spent waiting for a slot is part of the request's measured latency.

A memory budget (`memory_budget_bytes`, 0 = none) caps the bytes of the resident models. A variant
added with a `loader` (how to rebuild it, e.g. from the verified cache) may be evicted, least recently
active first, and is loaded on demand when a switch names it: room is made first, the load happens
outside the swap lock while requests go on on the old variant, then the swap, then the old variant is
evicted if the budget needs it (requests in flight keep their own reference). So a switch never holds
more than the two variants involved beyond the steady state. The active variant is never evicted.

What it holds are `edge.variants` records: `VariantInfo` for every variant known, `LoadedVariant` for
those in memory, made by any backend (`edge.backends`): a request runs the variant's `forward` on pixels
checked and scaled to [0, 1] here. This module imports no torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from common.errors import PrunefleetError
from common.files import short_id
from common.variant_spec import VariantSpec
from common.wire import TensorError, pixels_to_unit
from edge.variants import LoadedVariant, Loader, VariantInfo

INPUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class NotReadyError(PrunefleetError, RuntimeError):
    """No variant is active yet."""


class UnknownVariantError(PrunefleetError, LookupError):
    """A variant id the runtime does not hold."""


@dataclass(frozen=True)
class RuntimeConfig:
    """The runtime's settings: inference slots, the largest batch taken, the memory budget."""

    slots: int = 1  # concurrent inferences; size it to the device
    max_batch: int = 256
    memory_budget_bytes: int = 0  # resident model bytes (0 = hold every variant)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_batch < 1:
            raise ValueError("slots and max_batch must be >= 1")
        if self.memory_budget_bytes < 0:
            raise ValueError("memory_budget_bytes must be >= 0")


def libc_trim() -> Callable[[], None]:
    """glibc's malloc_trim (returns freed heap to the system after an eviction), or a no-op."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim else (lambda: None)


@dataclass(frozen=True)
class SwitchRecord:
    """What one switch did and cost: the swap's own time apart from an on-demand load's."""

    from_variant: str  # "" for the first activation
    to_variant: str
    reason: str
    switch_us: float  # time the swap took, lock included
    load_s: float = 0.0  # on-demand load of a variant that was not resident (0 if it was)
    evicted: tuple[str, ...] = ()  # variants dropped from memory to stay within the budget


class Runtime:
    """The variants this edge knows, those in memory, and the active one (see the module's doc)."""

    def __init__(self, config: RuntimeConfig):
        self.config = config
        self._known: Mapping[str, VariantInfo] = MappingProxyType({})
        self._resident: Mapping[str, LoadedVariant] = MappingProxyType({})
        self._bytes: dict[str, int] = {}
        self._loaders: dict[str, Loader] = {}
        self._used: dict[str, int] = {}  # variant id -> tick of its last activation (LRU)
        self._tick = 0
        self._active: LoadedVariant | None = None
        self._lock = threading.Lock()  # the swap
        self._memory_lock = threading.RLock()  # what is resident: loads, evictions, portfolio changes
        self._slots = threading.BoundedSemaphore(config.slots)
        self._in_flight = 0  # inferences running or waiting for a slot
        self._slot_s = 0.0  # wall time inferences have held a slot, in all
        self._count_lock = threading.Lock()
        self._trim = libc_trim()

    def add(self, variant: LoadedVariant, loader: Loader | None = None) -> tuple[str, ...]:
        """Hold a variant. With a `loader` it may be evicted and loaded again on demand. Returns the
        variants evicted to stay within the budget."""
        with self._memory_lock:
            self._known = MappingProxyType({**self._known, variant.variant_id: variant.info})
            if loader is not None:
                self._loaders[variant.variant_id] = loader
            self._hold(variant)
            return self._evict_over_budget(keep={variant.variant_id})

    def _hold(self, variant: LoadedVariant) -> None:
        self._bytes[variant.variant_id] = variant.memory_bytes
        self._resident = MappingProxyType({**self._resident, variant.variant_id: variant})
        self._tick += 1
        self._used[variant.variant_id] = self._tick

    def _drop(self, variant_id: str) -> None:
        self._resident = MappingProxyType({k: v for k, v in self._resident.items() if k != variant_id})
        self._bytes.pop(variant_id, None)

    def _evict_over_budget(self, keep: set[str], incoming: int = 0) -> tuple[str, ...]:
        """Evict least recently active variants (never the active one, nor `keep`, nor one that could
        not be loaded again) until the resident bytes plus `incoming` fit the budget."""
        budget, evicted = self.config.memory_budget_bytes, []
        if not budget:
            return ()
        active = self._active.variant_id if self._active else ""
        evictable = sorted(
            (self._used.get(k, 0), k) for k in self._resident if k not in keep and k != active and k in self._loaders
        )
        for _, variant_id in evictable:
            if self.resident_bytes() + incoming <= budget:
                break
            self._drop(variant_id)
            evicted.append(variant_id)
        if evicted:
            self._trim()
        return tuple(evicted)

    def remove(self, variant_id: str) -> None:
        """Forget a variant; the active one stays (switch away first)."""
        with self._memory_lock:
            if self._active is not None and self._active.variant_id == variant_id:
                raise ValueError(f"variant {short_id(variant_id)} is active")
            self._known = MappingProxyType({k: v for k, v in self._known.items() if k != variant_id})
            self._drop(variant_id)
            self._loaders.pop(variant_id, None)
            self._used.pop(variant_id, None)

    def variants(self) -> Mapping[str, VariantInfo]:
        """A read-only snapshot of every variant known, resident or loadable on demand."""
        return self._known

    def resident(self) -> Mapping[str, LoadedVariant]:
        """A read-only snapshot of the variants in memory."""
        return self._resident

    def resident_bytes(self) -> int:
        return sum(self._bytes.values())

    @property
    def active(self) -> LoadedVariant | None:
        return self._active

    def _load(self, variant_id: str) -> tuple[LoadedVariant, float, tuple[str, ...]]:
        """Load a known variant that is not resident: make room first, then build it."""
        loader = self._loaders.get(variant_id)
        if variant_id not in self._known or loader is None:
            raise UnknownVariantError(f"variant {short_id(variant_id)} is not loaded")
        evicted = self._evict_over_budget(keep={variant_id}, incoming=self._known[variant_id].size_bytes)
        start = time.perf_counter()
        target = loader()
        if target.variant_id != variant_id:
            raise UnknownVariantError(f"loading {short_id(variant_id)} gave {short_id(target.variant_id)}")
        load_s = time.perf_counter() - start
        self._hold(target)
        return target, load_s, evicted

    def switch(self, variant_id: str, reason: str = "") -> SwitchRecord:
        """Make `variant_id` active: one reference assignment under the lock, after an on-demand load
        if the variant is not resident."""
        with self._memory_lock:
            target, load_s, evicted = self._resident.get(variant_id), 0.0, ()
            if target is None:
                target, load_s, evicted = self._load(variant_id)
            start = time.perf_counter()
            with self._lock:
                previous, self._active = self._active, target
            elapsed_us = (time.perf_counter() - start) * 1e6
            self._tick += 1
            self._used[variant_id] = self._tick
            evicted += self._evict_over_budget(keep={variant_id})
        return SwitchRecord(previous.variant_id if previous else "", variant_id, reason, elapsed_us, load_s, evicted)

    def _expected(self, spec: VariantSpec) -> str:
        dims = ", ".join(str(d) for d in spec.input_shape)
        return f"expected shape [N, {dims}] with 1 <= N <= {self.config.max_batch}"

    def expected_input(self) -> str:
        """What predict takes now, for error messages: shape, batch bound and dtypes."""
        active = self._active
        if active is None:
            return "no variant is loaded yet"
        return f"{self._expected(active.spec)}, of uint8 pixels or float32 in [0, 1]"

    def _validate(self, array: np.ndarray, variant: LoadedVariant) -> np.ndarray:
        if array.dtype not in INPUT_DTYPES:
            raise TensorError(
                f"dtype {array.dtype} is not supported: send uint8 pixels or float32 in [0, 1]; "
                f"{self._expected(variant.spec)}"
            )
        shape = tuple(variant.spec.input_shape)
        if array.ndim != 4 or tuple(array.shape[1:]) != shape or not 1 <= array.shape[0] <= self.config.max_batch:
            raise TensorError(f"{self._expected(variant.spec)}, got {list(array.shape)}")
        unit = pixels_to_unit(array)
        if not unit.flags.writeable or not unit.flags.c_contiguous:
            unit = np.array(unit, dtype=np.float32, order="C")
        return unit

    def predict(self, array: np.ndarray) -> tuple[np.ndarray, str]:
        """Logits (float32 [N, classes]) for a batch of pixels, and the id of the variant that answered."""
        x, variant = self.validate(array)
        return self.run(variant, x), variant.variant_id

    def validate(self, array: np.ndarray) -> tuple[np.ndarray, LoadedVariant]:
        """Pixels as float32 in [0, 1] (C-contiguous), checked against the active variant, and that variant."""
        variant = self._active
        if variant is None:
            raise NotReadyError("no variant is loaded yet")
        return self._validate(array, variant), variant

    def run(self, variant: LoadedVariant, x: np.ndarray) -> np.ndarray:
        """Logits of `variant` on a validated batch in [0, 1], in one of the device's slots."""
        with self._count_lock:
            self._in_flight += 1
        started = None
        try:
            with self._slots:
                started = time.perf_counter()
                logits = variant.forward(x)
        finally:
            with self._count_lock:
                self._in_flight -= 1
                if started is not None:
                    self._slot_s += time.perf_counter() - started
        return np.asarray(logits, dtype=np.float32)

    @property
    def slot_seconds(self) -> float:
        """Wall time inferences have held a slot since the runtime started: with the inferences counted,
        how long each really took on this device under its current load, other processes and Python's
        own threads included."""
        return self._slot_s

    @property
    def in_flight(self) -> int:
        """Inferences running or waiting for a slot."""
        return self._in_flight
