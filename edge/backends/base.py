"""What every serving backend of the edge offers, and how a listing is split between what one serves and
what it leaves out.

A backend (`edge.backends`: `torch`, `onnxruntime`) serves members of a portfolio from one kind of file:
`artifact` names the file it fetches for a member (its id, size, the cloud's signature over it and the
suffix the cache keeps it under) or says why it cannot serve that member; `loader` makes a member ready
from its verified file in the cache, as often as the memory budget asks (on arrival, then on demand);
`held_bytes` is what holding a member costs, known before it loads, and the `LoadedVariant` a loader
gives runs batches of pixels in [0, 1] to logits (`forward`), warmed up, and carries that cost
(`memory_bytes`), which the memory budget and the policy count. Everything else (fetching, verification, profiling,
switching, telemetry, metrics, the policy) is the same for every backend and imports none of them.

This module imports no torch and no onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.onnx_format import FLOAT32, PRECISIONS
from edge.variants import Loader, VariantInfo

SUFFIXES = (".safetensors", ".onnx")  # what the cache keeps files under


@dataclass(frozen=True)
class Artifact:
    """The file a backend serves a member from: its id (sha256), size, the cloud's signature over it
    (empty: unsigned) and the suffix the cache keeps it under."""

    file_id: str
    size_bytes: int
    signature: bytes
    suffix: str

    def __post_init__(self) -> None:
        if self.suffix not in SUFFIXES:
            raise ValueError(f"suffix must be one of {', '.join(SUFFIXES)}, got {self.suffix!r}")


@dataclass(frozen=True)
class BackendSettings:
    """What a backend is made with: inference threads, the largest batch, whether torch variants are
    optimized, and the import-path architectures a torch edge may build."""

    threads: int = 1
    max_batch: int = 256
    optimize_models: bool = True
    allowed_models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.threads < 1 or self.max_batch < 1:
            raise ValueError(f"threads and max_batch must be >= 1, got {self.threads} and {self.max_batch}")


class Backend(Protocol):
    """One way of serving members (see the module docstring)."""

    name: str

    def artifact(self, info) -> Artifact | str:
        """The file to fetch for a `portfolio_pb2.VariantInfo`, or why this backend cannot serve it."""
        ...

    def held_bytes(self, artifact: Artifact) -> int:
        """What holding the member served from `artifact` costs in memory, before it is loaded (the memory
        budget and the policy count it)."""
        ...

    def loader(self, info: VariantInfo, artifact: Artifact, path: Path) -> Loader:
        """How to make the member ready from its verified file (`path`), on arrival and again on demand."""
        ...


def precision(info) -> str:
    """A listed member's precision ("" from a cloud older than the field: float32)."""
    return info.precision or FLOAT32


@dataclass(frozen=True)
class Offer:
    """A listing split for one backend: what it serves (each member with its file) and what it leaves
    out (each member with the reason)."""

    served: tuple[tuple[object, Artifact], ...]
    left_out: tuple[tuple[object, str], ...]


def offer(backend: Backend, listing: Iterable) -> Offer:
    """Split the members of a listing (`portfolio_pb2.VariantInfo`s) into those `backend` serves and
    those it leaves out, with the reason (an unknown precision is left out by every backend)."""
    served, left_out = [], []
    for info in listing:
        found = backend.artifact(info) if precision(info) in PRECISIONS else f"unknown precision {info.precision!r}"
        if isinstance(found, Artifact):
            served.append((info, found))
        else:
            left_out.append((info, found))
    return Offer(tuple(served), tuple(left_out))
