"""The runtime: every variant in memory, one active reference, switching by reference swap.

A request reads the active reference once and finishes on that variant, whatever switches happen
meanwhile; new requests see the new reference. A switch is one assignment under a lock, so it takes
microseconds and never fails a request. A semaphore sized to the device (`slots`) bounds concurrent
inference, so time spent waiting for a slot is part of the request's measured latency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from common.variant import VariantSpec
from common.wire import TensorError, pixels_to_unit

INPUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


class NotReadyError(RuntimeError):
    """No variant is active yet."""


class UnknownVariantError(LookupError):
    """A variant id the runtime does not hold."""


@dataclass(frozen=True)
class RuntimeConfig:
    slots: int = 1  # concurrent inferences; size it to the device
    max_batch: int = 256

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_batch < 1:
            raise ValueError("slots and max_batch must be >= 1")


@dataclass(frozen=True)
class VariantInfo:
    """What the portfolio says about a variant."""

    variant_id: str
    name: str
    accuracy: float
    size_bytes: int
    params: int


@dataclass(frozen=True)
class LoadedVariant:
    info: VariantInfo
    model: nn.Module
    spec: VariantSpec
    mean: torch.Tensor  # [1, C, 1, 1]
    std: torch.Tensor

    @property
    def variant_id(self) -> str:
        return self.info.variant_id


def loaded(info: VariantInfo, spec: VariantSpec, model: nn.Module) -> LoadedVariant:
    """A variant ready to serve: the model in eval mode and its normalization as broadcastable tensors."""
    channels = spec.input_shape[0]
    return LoadedVariant(info, model.eval(), spec,
                         torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1),
                         torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1))


@dataclass(frozen=True)
class SwitchRecord:
    from_variant: str  # "" for the first activation
    to_variant: str
    reason: str
    switch_us: float  # time the swap took, lock included


class Runtime:
    def __init__(self, config: RuntimeConfig):
        self.config = config
        self._variants: Mapping[str, LoadedVariant] = MappingProxyType({})
        self._active: LoadedVariant | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.slots)

    def add(self, variant: LoadedVariant) -> None:
        with self._lock:
            self._variants = MappingProxyType({**self._variants, variant.variant_id: variant})

    def remove(self, variant_id: str) -> None:
        """Drop a variant from memory; the active one stays (switch away first)."""
        with self._lock:
            if self._active is not None and self._active.variant_id == variant_id:
                raise ValueError(f"variant {variant_id[:12]} is active")
            self._variants = MappingProxyType({k: v for k, v in self._variants.items() if k != variant_id})

    def variants(self) -> Mapping[str, LoadedVariant]:
        """A read-only snapshot of the variants held."""
        return self._variants

    def resident_bytes(self) -> int:
        return sum(v.info.size_bytes for v in self._variants.values())

    @property
    def active(self) -> LoadedVariant | None:
        return self._active

    def switch(self, variant_id: str, reason: str = "") -> SwitchRecord:
        """Make `variant_id` active: one reference assignment under the lock."""
        start = time.perf_counter()
        with self._lock:
            target = self._variants.get(variant_id)
            if target is None:
                raise UnknownVariantError(f"variant {variant_id[:12]} is not loaded")
            previous, self._active = self._active, target
        elapsed_us = (time.perf_counter() - start) * 1e6
        return SwitchRecord(previous.variant_id if previous else "", variant_id, reason, elapsed_us)

    def _expected(self, spec: VariantSpec) -> str:
        dims = ", ".join(str(d) for d in spec.input_shape)
        return f"expected shape [N, {dims}] with 1 <= N <= {self.config.max_batch}"

    def expected_input(self) -> str:
        """What predict takes now, for error messages: shape, batch bound and dtypes."""
        active = self._active
        if active is None:
            return "no variant is loaded yet"
        return f"{self._expected(active.spec)}, of uint8 pixels or float32 in [0, 1]"

    def _validate(self, array: np.ndarray, variant: LoadedVariant) -> torch.Tensor:
        if array.dtype not in INPUT_DTYPES:
            raise TensorError(f"dtype {array.dtype} is not supported: send uint8 pixels or float32 in [0, 1]; "
                              f"{self._expected(variant.spec)}")
        shape = tuple(variant.spec.input_shape)
        if array.ndim != 4 or tuple(array.shape[1:]) != shape or not 1 <= array.shape[0] <= self.config.max_batch:
            raise TensorError(f"{self._expected(variant.spec)}, got {list(array.shape)}")
        unit = pixels_to_unit(array)
        if not unit.flags.writeable or not unit.flags.c_contiguous:
            unit = np.array(unit, dtype=np.float32, order="C")
        return torch.from_numpy(unit)

    def predict(self, array: np.ndarray) -> tuple[np.ndarray, str]:
        """Logits (float32 [N, classes]) for a batch of pixels, and the id of the variant that answered."""
        variant = self._active
        if variant is None:
            raise NotReadyError("no variant is loaded yet")
        x = self._validate(array, variant)
        with self._slots, torch.inference_mode():
            logits = variant.model((x - variant.mean) / variant.std)
        return logits.numpy().astype(np.float32, copy=False), variant.variant_id
