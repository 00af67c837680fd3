"""The ONNX side of a portfolio's members: each float32 variant's ONNX artifact and, on request, its
int8 member.

A float32 variant's ONNX file (`cloud.build.onnx_export`) is exported from the compact model its
variant file holds, checked against that model with ONNX Runtime on the build's check images and
random inputs (max abs diff 1e-4, same argmax), and only then stored, as `variants/<sha256>.onnx`; a
file that differs stops the build with an `ExportError` naming the variant. An int8 member
(`cloud.build.quantize`) is that file statically quantized, calibrated on training images, its
accuracy measured with ONNX Runtime on the whole test split.

Quantizing is the slow part of both (calibration, then a pass over the test split), so each int8 file
made is recorded in the work directory under what made it (`INT8_RECORD`): a build or `portfolio
quantize` that is interrupted and run again takes the files it already made instead of quantizing
again. The record is only a shortcut: a file it names is used only if it is stored intact.

This module imports `onnx` and `onnxruntime` (the `onnx` extra): the build imports it only when it
makes ONNX files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import torch
from torch import nn

from cloud.build import onnx_export, quantize
from cloud.build.methods.base import BuildContext
from cloud.build.store import INT8, ONNXRUNTIME, PortfolioStore, VariantEntry
from cloud.build.timing import Member, OrtServed, untimed
from common import datasets
from common.files import atomic_write_json, sha256_file
from common.variant_spec import VariantSpec

INT8_RECORD = "int8.json"  # in the work directory: what made each int8 file -> its id


def quantize_config(calibration_images: int, seed: int, threads: int) -> quantize.QuantizeConfig:
    """How the build and `portfolio quantize` make int8 members: MinMax calibration (see
    `cloud.build.quantize`) on `calibration_images` training images drawn with the build's seed."""
    return quantize.QuantizeConfig(calibration_images=calibration_images, seed=seed, threads=threads)


def with_onnx(
    entry: VariantEntry, model: nn.Module, spec: VariantSpec, check: torch.Tensor, store: PortfolioStore, threads: int
) -> tuple[VariantEntry, bytes, OrtServed]:
    """`entry`, a float32 variant of `model` with `spec`, given its ONNX file: exported, checked
    against `model` on `check` (normalized inputs) and random ones, then stored. Returns the entry
    naming the file, its bytes, and the file served by ONNX Runtime on `threads` threads."""
    data = onnx_export.export(model, spec, entry.variant_id)
    report = onnx_export.check(data, model, check, onnx_export.ExportConfig(threads=threads))
    onnx_id = store.put_onnx(data)
    named = replace(entry, onnx_id=onnx_id, onnx_bytes=len(data), onnx_max_abs_diff=report.max_abs_diff)
    return named, data, OrtServed(onnx_export.session(data, threads))


def stored_onnx(store: PortfolioStore, onnx_id: str | None) -> bytes | None:
    """The stored ONNX file `onnx_id` when it is there and hashes to its id; else None."""
    if onnx_id is None:
        return None
    path = store.onnx_path(onnx_id)
    if not path.is_file() or path.stat().st_size > onnx_export.MAX_ONNX_BYTES or sha256_file(path) != onnx_id:
        return None
    return path.read_bytes()


def _recipe(onnx_id: str, calibration: torch.Tensor, test_size: int, config: quantize.QuantizeConfig) -> str:
    """What an int8 file is made from: the float32 file, the calibration images, the settings (threads
    aside: they change no byte) and the size of the test split its accuracy is measured on."""
    settings = {**asdict(config), "threads": None}
    images = hashlib.sha256(calibration.contiguous().numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps([onnx_id, images, settings, test_size], sort_keys=True).encode()).hexdigest()


def _quantized(
    parent: VariantEntry,
    float32: bytes,
    calibration: torch.Tensor,
    test: datasets.Split | datasets.StreamSplit,
    store: PortfolioStore,
    config: quantize.QuantizeConfig,
) -> bytes:
    """The int8 file of `float32`: taken from the record when it made it before, else quantized,
    stored and recorded."""
    path = store.work_dir / INT8_RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    recipe = _recipe(parent.onnx_id or "", calibration, len(test), config)
    made = stored_onnx(store, record.get(recipe))
    if made is not None:
        return made
    data = quantize.quantize_int8(float32, calibration, test, config)
    atomic_write_json(path, {**record, recipe: store.put_onnx(data)})
    return data


def int8_member(
    parent: VariantEntry,
    float32: bytes,
    calibration: torch.Tensor,
    test: datasets.Split | datasets.StreamSplit,
    store: PortfolioStore,
    config: quantize.QuantizeConfig,
) -> Member:
    """The int8 member of `parent` (a float32 variant whose ONNX file is `float32`), ready to time:
    its own id, name, file size and accuracy (measured on `test`), the parent's structural figures."""
    data = _quantized(parent, float32, calibration, test, store, config)
    spec, int8_id = onnx_export.spec_of(data), store.put_onnx(data)
    entry = replace(
        untimed(parent),
        variant_id=int8_id,
        name=spec.name,
        size_bytes=len(data),
        accuracy=spec.accuracy,
        precision=INT8,
        backend=ONNXRUNTIME,
        parent=parent.variant_id,
        onnx_id=int8_id,
        onnx_bytes=len(data),
        onnx_max_abs_diff=None,
    )
    return Member(entry, OrtServed(onnx_export.session(data, config.threads)))


def build_members(
    entry: VariantEntry,
    model: nn.Module,
    spec: VariantSpec,
    served: nn.Module,
    context: BuildContext,
    check: torch.Tensor,
) -> list[Member]:
    """A float32 variant the build derived (`model`, its `spec`, `served` as an edge serves it) with
    its ONNX file, checked on `check` (the build's check images), and with `--int8` its int8 member
    after it."""
    config, store = context.config, context.store
    entry, data, ort = with_onnx(entry, model, spec, check, store, config.threads)
    members = [Member(entry, served, ort)]
    if config.int8:
        settings = quantize_config(config.calibration_images, config.seed, config.threads)
        calibration = quantize.calibration_sample(context.data.train, settings)
        members.append(int8_member(entry, data, calibration, context.data.test, store, settings))
    return members
