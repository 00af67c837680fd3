"""The portfolio store: one directory holding a manifest and content-addressed variant files.

STORE/manifest.json               the portfolio: what was built, and one entry per variant
STORE/variants/<sha256>.safetensors
STORE/work/                       checkpoints of an unfinished build (resumable)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.errors import PrunefleetError
from common.files import (  # noqa: F401
    atomic_write_bytes,
    atomic_write_json,
    is_sha256_hex,
    portfolio_id,
    sha256_bytes,
    short_id,
)


class StoreError(PrunefleetError, LookupError):
    """A store or variant that does not exist or cannot be read."""


@dataclass(frozen=True)
class VariantEntry:
    variant_id: str  # sha256 of the file
    name: str
    level: int
    method: str
    arch: str
    params: int
    size_bytes: int
    accuracy: float  # compact model, test split
    sparse_accuracy: float
    sparsity: float
    compression: float  # conv/linear weights / remaining weights of the sparse parent
    params_ratio: float  # dense params / compact params
    latency_ms_b1: float
    latency_ms_b32: float
    max_abs_diff: float = 0.0  # surgery equivalence check
    macs: int = 0  # conv and linear multiply-accumulates per input, compact model
    sparse_params: int = 0  # parameters of the sparse parent as stored dense (its pruned zeros included)
    # quartiles of the latency over the interleaved rounds that timed every variant of the portfolio
    # together (None in manifests written before they were measured)
    latency_ms_b1_q1: float | None = None
    latency_ms_b1_q3: float | None = None
    latency_ms_b32_q1: float | None = None
    latency_ms_b32_q3: float | None = None


@dataclass(frozen=True)
class Manifest:
    portfolio_id: str
    model: str
    dataset: str
    method: str
    created: float
    settings: dict = field(default_factory=dict)
    variants: tuple[VariantEntry, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> Manifest:
        variants = tuple(VariantEntry(**v) for v in raw.get("variants", ()))
        return cls(**{**raw, "variants": variants})


class PortfolioStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def variant_path(self, variant_id: str) -> Path:
        if not is_sha256_hex(variant_id):
            raise StoreError(f"variant id {variant_id!r} is not a sha256 hex string")
        return self.root / "variants" / f"{variant_id}.safetensors"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> Manifest:
        try:
            return Manifest.from_json(json.loads(self.manifest_path.read_text()))
        except FileNotFoundError:
            raise StoreError(
                f"no portfolio in {self.root} (no manifest.json); build one with 'prunefleet portfolio build --out DIR'"
            ) from None
        except (json.JSONDecodeError, TypeError) as err:
            raise StoreError(f"{self.manifest_path} is unreadable: {err}") from err

    def put_variant(self, data: bytes) -> str:
        """Store variant-file bytes under their sha256; returns the id."""
        variant_id = sha256_bytes(data)
        path = self.variant_path(variant_id)
        if not path.exists():
            atomic_write_bytes(path, data)
        return variant_id

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())

    def find(self, key: str) -> VariantEntry:
        """A variant by full id, unique id prefix, or name."""
        entries = self.manifest().variants
        matches = [v for v in entries if v.name == key or v.variant_id == key] or [
            v for v in entries if len(key) >= 4 and v.variant_id.startswith(key)
        ]
        if len(matches) != 1:
            known = ", ".join(f"{v.name} ({short_id(v.variant_id)})" for v in entries)
            what = "is ambiguous" if matches else "matches no variant"
            raise StoreError(f"{key!r} {what}; known: {known}")
        return matches[0]
