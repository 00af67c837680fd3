"""The portfolio store: one directory holding a manifest and content-addressed variant files.

STORE/manifest.json               the portfolio: what was built, one entry per member, the dense model
STORE/variants/<sha256>.safetensors   a float32 variant (and the dense model, to time it again)
STORE/variants/<sha256>.onnx      a float32 variant's ONNX artifact, or an int8 member
STORE/work/                       checkpoints of an unfinished build (resumable)

A portfolio's members are its float32 variants, each a safetensors file served by torch (and, unless
built with `--no-onnx`, its ONNX artifact, `onnx_id`), and its int8 members, each an ONNX file only,
quantized from one float32 variant (`parent`) and served by ONNX Runtime. Every member's id is the
sha256 of its own file, and the portfolio's id is computed from all of them (`served_portfolio_id`).

The cloud serves every member (`Manifest.served`) and each edge takes those its backend serves: an edge
serving with torch the variant files, one serving with ONNX Runtime every member's ONNX file. The
portfolio id covers every member, so one id names one listing whatever backends the fleet runs: adding
int8 members (`portfolio quantize`) makes a new portfolio, deployed like any other, and every edge,
whichever members it holds, reports the id of the listing it holds all its servable members of.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from common.errors import PrunefleetError
from common.files import (  # portfolio_id and short_id: the store's callers take them from here too
    atomic_write_bytes,
    atomic_write_json,
    is_sha256_hex,
    portfolio_id,
    sha256_bytes,
    short_id,
)
from common.onnx_format import FLOAT32, INT8  # a member's precision

TORCH, ONNXRUNTIME = "torch", "onnxruntime"  # what serves a member, and what its latencies measure


class StoreError(PrunefleetError, LookupError):
    """A store or variant that does not exist or cannot be read."""


@dataclass(frozen=True)
class VariantEntry:
    """One member of the portfolio: a float32 variant, or an int8 member quantized from one, which has
    its own id, file size, accuracy and latencies and repeats its parent's other figures (level,
    sparsity, compression, params, MACs, the sparse model's accuracy and params, surgery's max abs
    diff). Fields added since the first manifests default to what those meant."""

    variant_id: str  # sha256 of the member's file (float32: the safetensors file; int8: its ONNX file)
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
    # against the portfolio's dense model (`Manifest.dense`), timed in the same rounds (None in manifests
    # written before the dense model was measured): accuracy points gained (negative: lost), how many
    # times faster at batch 1 and 32, and how many times fewer multiply-accumulates
    acc_delta_pp: float | None = None
    speedup_b1: float | None = None
    speedup_b32: float | None = None
    macs_ratio: float | None = None
    # the member's precision, what serves it (the backend its `latency_ms_*` figures and speedups above
    # are of: torch for a float32 variant as an edge serves it, ONNX Runtime for an int8 member) and,
    # for an int8 member, the id of the float32 variant it was quantized from
    precision: str = FLOAT32
    backend: str = TORCH
    parent: str | None = None
    # the member's ONNX file, variants/<onnx_id>.onnx (an int8 member: its own id and size; None: none
    # made) and, for a float32 variant, ONNX Runtime's max abs diff from the torch model in its check
    onnx_id: str | None = None
    onnx_bytes: int | None = None
    onnx_max_abs_diff: float | None = None
    # a float32 variant's ONNX file served by ONNX Runtime, timed in the same rounds as everything else,
    # and how many times faster than the dense model (torch) that is
    ort_latency_ms_b1: float | None = None
    ort_latency_ms_b1_q1: float | None = None
    ort_latency_ms_b1_q3: float | None = None
    ort_latency_ms_b32: float | None = None
    ort_latency_ms_b32_q1: float | None = None
    ort_latency_ms_b32_q3: float | None = None
    ort_speedup_b1: float | None = None
    ort_speedup_b32: float | None = None


@dataclass(frozen=True)
class DenseEntry:
    """The portfolio's dense model, what its owner compares every variant with: measured on the same
    test split, and served as an edge serves it in the same interleaved rounds as the variants. It is
    no member (no listing names it: its file is kept only to time it again); `source` says where it
    came from."""

    name: str
    arch: str
    params: int
    macs: int
    accuracy: float  # test split
    source: str  # e.g. "level 0 of shifter", "the given --weights", "trained by the build"
    trained_by_build: bool = False  # trained for this comparison alone, with the build's recipe and seed
    epochs: int = 0  # epochs the build trained it for (0 when it did not)
    level: int | None = None  # the method's level it is, when it is one
    # its weights as a variant file, variants/<variant_id>.safetensors, so that the portfolio can be timed
    # again with it (`prunefleet portfolio quantize`); None in manifests written before it was stored
    variant_id: str | None = None
    # served by torch as an edge serves a variant, like every float32 variant
    latency_ms_b1: float = 0.0
    latency_ms_b32: float = 0.0
    latency_ms_b1_q1: float | None = None
    latency_ms_b1_q3: float | None = None
    latency_ms_b32_q1: float | None = None
    latency_ms_b32_q3: float | None = None


def served_members(entries) -> tuple[VariantEntry, ...]:
    """The members the cloud lists and serves: every one, float32 and int8 (see `Manifest.served`);
    each edge takes those its backend serves."""
    return tuple(entries)


def served_portfolio_id(entries) -> str:
    """The portfolio id of these members: the hash of the ids of every member served, float32 and
    int8 (`common.files.portfolio_id`), the id the listing carries and edges report."""
    return portfolio_id([e.variant_id for e in served_members(entries)])


@dataclass(frozen=True)
class Manifest:
    portfolio_id: str
    model: str
    dataset: str
    method: str
    created: float
    settings: dict = field(default_factory=dict)
    variants: tuple[VariantEntry, ...] = ()
    dense: DenseEntry | None = None  # None in manifests written before it was measured

    def to_json(self) -> dict:
        return asdict(self)

    def served(self) -> Manifest:
        """The portfolio as the cloud lists it: every member (float32 variants and int8 members), under
        the id computed from all of them. A manifest written when int8 members were left out of the id
        (they were served to no edge then) is served under the id of all its members, which the cloud
        records when it adds the store."""
        members = served_members(self.variants)
        return replace(self, variants=members, portfolio_id=served_portfolio_id(members))

    @classmethod
    def from_json(cls, raw: dict) -> Manifest:
        variants = tuple(VariantEntry(**v) for v in raw.get("variants", ()))
        dense = DenseEntry(**raw["dense"]) if raw.get("dense") else None
        return cls(**{**raw, "variants": variants, "dense": dense})


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

    def onnx_path(self, onnx_id: str) -> Path:
        if not is_sha256_hex(onnx_id):
            raise StoreError(f"ONNX file id {onnx_id!r} is not a sha256 hex string")
        return self.root / "variants" / f"{onnx_id}.onnx"

    def member_path(self, entry: VariantEntry) -> Path:
        """The file a member's id is the sha256 of: an int8 member's ONNX file, else the variant file."""
        return self.onnx_path(entry.variant_id) if entry.precision == INT8 else self.variant_path(entry.variant_id)

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

    def put_onnx(self, data: bytes) -> str:
        """Store ONNX-file bytes under their sha256; returns the id."""
        onnx_id = sha256_bytes(data)
        path = self.onnx_path(onnx_id)
        if not path.exists():
            atomic_write_bytes(path, data)
        return onnx_id

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json())

    def find(self, key: str) -> VariantEntry:
        """A member by full id, unique id prefix, or name."""
        entries = self.manifest().variants
        matches = [v for v in entries if v.name == key or v.variant_id == key] or [
            v for v in entries if len(key) >= 4 and v.variant_id.startswith(key)
        ]
        if len(matches) != 1:
            known = ", ".join(f"{v.name} ({short_id(v.variant_id)})" for v in entries)
            what = "is ambiguous" if matches else "matches no variant"
            raise StoreError(f"{key!r} {what}; known: {known}")
        return matches[0]

    def describe(self, key: str) -> dict:
        """A member in full (found as `find` does), with the paths of its files (`path`: the one its id
        is the sha256 of; `onnx_path`: its ONNX file, if any) and the portfolio's dense model it is
        compared with (None for a portfolio built before that was measured)."""
        entry, dense = self.find(key), self.manifest().dense
        paths = {
            "path": str(self.member_path(entry)),
            "onnx_path": str(self.onnx_path(entry.onnx_id)) if entry.onnx_id else None,
        }
        return {**asdict(entry), **paths, "dense": dense and asdict(dense)}
