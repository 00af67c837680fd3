"""`prunefleet portfolio quantize`: int8 members added to a portfolio built without them.

Every float32 variant of the store that has no int8 member yet gets the one `portfolio build --int8`
would have made: calibrated on the same training images (the build's dataset, `--subset`, seed and
`--calibration-images`, read from the manifest's settings), its accuracy measured on the whole test
split. A float32 variant without an ONNX file (built with `--no-onnx`, or before variants had one)
gets it first, exported from its variant file and checked as the build checks it. Then every member
and the dense model (rebuilt from its stored file) are timed again together, so that every figure of
the manifest still comes from one set of interleaved rounds, and the manifest is rewritten at once
(atomically) with the portfolio id of all its members. Variant ids do not change.

A store whose every float32 variant has its int8 member is left as it is: nothing is rewritten, not
even the timings. An interrupted run resumes: the int8 files it made are recorded
(`cloud.build.artifacts`), and the manifest changes only at the end.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from cloud.build import artifacts, onnx_export, quantize, timing
from cloud.build import data as build_data
from cloud.build.store import (
    FLOAT32,
    INT8,
    DenseEntry,
    Manifest,
    PortfolioStore,
    StoreError,
    VariantEntry,
    served_portfolio_id,
)
from cloud.build.timing import Member, OrtServed
from common import datasets, variant
from common.errors import PrunefleetError
from common.files import short_id
from common.inference import for_inference

log = logging.getLogger(__name__)
DEFAULTS = {"calibration_images": 1024, "check_images": 256, "seed": 0, "subset": 0, "threads": 2}  # BuildConfig's


class QuantizeError(PrunefleetError, RuntimeError):
    """A portfolio that int8 members cannot be added to as it is; the message says why."""


@dataclass(frozen=True)
class QuantizeSettings:
    """What `portfolio quantize` works on: the store, where the build's data is when it is no longer
    where the build read it, and the CPU threads of the timing (0: the build's)."""

    store: Path
    data_dir: Path | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: the build's), got {self.threads}")


def _setting(settings: dict, name: str) -> int:
    value = settings.get(name)
    return DEFAULTS[name] if value is None else int(value)


def _data(settings: dict, data_dir: Path | None) -> datasets.Dataset:
    """The build's data, as `cloud.build.data.for_build` gave it to the build, from its settings."""
    where = data_dir or settings.get("data_dir")
    loaded = build_data.load(
        settings.get("dataset") or "fashion-mnist",
        Path(where) if where else None,
        input_size=tuple(settings.get("input_size") or ()),
        seed=_setting(settings, "seed"),
    )
    train = loaded.train.subset(_setting(settings, "subset"), _setting(settings, "seed"))
    return datasets.Dataset(loaded.info, train, loaded.val, loaded.test)


@dataclass(frozen=True)
class _Inputs:
    """What the members are made with: calibration images, the test split, check images, settings."""

    calibration: torch.Tensor
    test: datasets.Split | datasets.StreamSplit
    check: torch.Tensor
    config: quantize.QuantizeConfig


def _inputs(manifest: Manifest, settings: QuantizeSettings, threads: int) -> _Inputs:
    raw = manifest.settings or {}
    data = _data(raw, settings.data_dir)
    config = artifacts.quantize_config(_setting(raw, "calibration_images"), _setting(raw, "seed"), threads)
    head = datasets.head(data.test, _setting(raw, "check_images"))
    check = datasets.normalize(head, data.info.mean, data.info.std)
    return _Inputs(quantize.calibration_sample(data.train, config), data.test, check, config)


def _ort(store: PortfolioStore, entry: VariantEntry, threads: int) -> tuple[bytes, OrtServed]:
    """A member's stored ONNX file (checked against its id) and the file served by ONNX Runtime."""
    data = artifacts.stored_onnx(store, entry.onnx_id)
    if data is None:
        raise StoreError(f"the ONNX file of {entry.name} ({short_id(entry.variant_id)}) is missing or damaged")
    return data, OrtServed(onnx_export.session(data, threads))


def _float32(store: PortfolioStore, entry: VariantEntry, inputs: _Inputs, threads: int) -> tuple[Member, bytes]:
    """A float32 variant rebuilt from its file, served as an edge serves it, with its ONNX file (made
    and checked now if it has none)."""
    held = variant.load(store.variant_path(entry.variant_id), entry.variant_id, allowed_models=(entry.arch,))
    if tuple(held.spec.input_shape) != tuple(inputs.check.shape[1:]):
        raise QuantizeError(
            f"{entry.name} takes {held.spec.input_shape}, the build's data is {tuple(inputs.check.shape[1:])}"
        )
    served = for_inference(copy.deepcopy(held.model), tuple(held.spec.input_shape))
    if artifacts.stored_onnx(store, entry.onnx_id) is None:
        entry, data, ort = artifacts.with_onnx(entry, held.model, held.spec, inputs.check, store, threads)
    else:
        data, ort = _ort(store, entry, threads)
    return Member(entry, served, ort), data


def _members(store: PortfolioStore, manifest: Manifest, inputs: _Inputs, threads: int) -> list[Member]:
    """Every member, each float32 variant followed by its int8 member (made now if it has none)."""
    children = {e.parent: e for e in manifest.variants if e.precision == INT8}
    members = []
    for entry in (e for e in manifest.variants if e.precision == FLOAT32):
        member, data = _float32(store, entry, inputs, threads)
        members.append(member)
        child = children.pop(entry.variant_id, None)
        if child is None:
            members.append(
                artifacts.int8_member(member.entry, data, inputs.calibration, inputs.test, store, inputs.config)
            )
            log.info("%s: int8 member %s added", entry.name, short_id(members[-1].entry.variant_id))
        else:
            members.append(Member(child, _ort(store, child, threads)[1]))
    for orphan in children.values():  # an int8 member whose parent left the portfolio stays a member
        members.append(Member(orphan, _ort(store, orphan, threads)[1]))
    return members


def _dense(store: PortfolioStore, manifest: Manifest) -> tuple[DenseEntry, nn.Module] | None:
    """The dense model rebuilt from its stored file and served as at build time; None for a manifest
    without one."""
    dense = manifest.dense
    if dense is None:
        return None
    if dense.variant_id is None:
        raise QuantizeError(
            f"portfolio {manifest.portfolio_id} was built before its dense model was stored, so its members "
            "cannot be timed again with it; build it again (with --int8 to get int8 members)"
        )
    held = variant.load(store.variant_path(dense.variant_id), dense.variant_id, allowed_models=(dense.arch,))
    return dense, for_inference(held.model, tuple(held.spec.input_shape))


def add_int8(settings: QuantizeSettings) -> tuple[Manifest, int]:
    """Add the missing int8 members to the portfolio in `settings.store`; returns the manifest (the
    one there, untouched, when none was missing) and how many were added."""
    store = PortfolioStore(settings.store)
    manifest = store.manifest()
    parents = {e.parent for e in manifest.variants if e.precision == INT8}
    missing = [e for e in manifest.variants if e.precision == FLOAT32 and e.variant_id not in parents]
    if not missing:
        return manifest, 0
    threads = settings.threads or _setting(manifest.settings or {}, "threads")
    torch.set_num_threads(threads)
    inputs = _inputs(manifest, settings, threads)
    members = _members(store, manifest, inputs, threads)
    dense = _dense(store, manifest)
    entries, timed_dense = timing.time_members(members, inputs.check.shape[1:], dense)
    updated = replace(manifest, portfolio_id=served_portfolio_id(entries), variants=tuple(entries), dense=timed_dense)
    store.write_manifest(updated)
    return updated, len(missing)
