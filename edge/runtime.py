"""The runtime: every variant in memory, one active reference, switching by reference swap.

A request reads the active reference once and finishes on that variant, whatever switches happen
meanwhile; new requests see the new reference. A semaphore sized to the device bounds concurrent
inference, so time spent waiting for a slot is part of the request's measured latency.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.variant import VariantSpec
from common.wire import TensorError, pixels_to_unit


class NotReadyError(RuntimeError):
    """No variant is loaded yet."""


class UnknownVariantError(KeyError):
    """A variant id the runtime does not hold."""


@dataclass(frozen=True)
class LoadedVariant:
    variant_id: str
    name: str
    accuracy: float
    spec: VariantSpec
    model: nn.Module
    size_bytes: int
    mean: torch.Tensor  # [1, C, 1, 1]
    std: torch.Tensor


def loaded(variant_id: str, name: str, accuracy: float, spec: VariantSpec, model: nn.Module, size_bytes: int):
    channels = spec.input_shape[0]
    return LoadedVariant(variant_id, name, accuracy, spec, model.eval(), size_bytes,
                         torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1),
                         torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1))


@dataclass(frozen=True)
class Switch:
    from_variant: str
    to_variant: str
    switch_us: float


class Runtime:
    def __init__(self, slots: int, max_batch: int = 256):
        if slots < 1 or max_batch < 1:
            raise ValueError("slots and max_batch must be >= 1")
        self._variants: dict[str, LoadedVariant] = {}
        self._active: LoadedVariant | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(slots)
        self.slots = slots
        self.max_batch = max_batch

    def add(self, variant: LoadedVariant) -> None:
        with self._lock:
            self._variants = {**self._variants, variant.variant_id: variant}

    def variants(self) -> dict[str, LoadedVariant]:
        return self._variants

    @property
    def active(self) -> LoadedVariant | None:
        return self._active

    def switch(self, variant_id: str) -> Switch:
        """Make `variant_id` active: one reference assignment under the lock."""
        start = time.perf_counter()
        with self._lock:
            target = self._variants.get(variant_id)
            if target is None:
                raise UnknownVariantError(f"variant {variant_id} is not loaded")
            previous, self._active = self._active, target
        elapsed_us = (time.perf_counter() - start) * 1e6
        return Switch(previous.variant_id if previous else "", variant_id, elapsed_us)

    def _validate(self, array: np.ndarray, variant: LoadedVariant) -> torch.Tensor:
        shape = variant.spec.input_shape
        expected = f"[N, {', '.join(map(str, shape))}] with 1 <= N <= {self.max_batch}"
        if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape) or not 1 <= array.shape[0] <= self.max_batch:
            raise TensorError(f"expected shape {expected}, got {list(array.shape)}")
        return torch.from_numpy(np.ascontiguousarray(pixels_to_unit(array), dtype=np.float32))

    def predict(self, array: np.ndarray) -> tuple[np.ndarray, str]:
        """Logits for a batch of pixels (uint8, or float32 in [0, 1]) and the variant that answered."""
        variant = self._active
        if variant is None:
            raise NotReadyError("no variant is loaded yet")
        x = self._validate(array, variant)
        with self._slots, torch.inference_mode():
            logits = variant.model((x - variant.mean) / variant.std)
        return logits.numpy(), variant.variant_id
