"""The measurements under `bench.suites.backends`: each portfolio built once with its int8 members, each
variant's three forms made ready by the edge's own backends, timed together, and their accuracies.

A form is what an edge holds (`edge.variants.LoadedVariant`), made by `edge.backends.create(...).loader`
from the stored file exactly as an agent makes it from its cache: the torch backend rebuilds the
variant file and optimizes it (BatchNorm folded, channels-last, checked), the ONNX Runtime backend opens
the ONNX file (size bound, sha256, no external data, metadata naming the member) with the given intra-op
threads. Timing and accuracy both go through the form's `forward`, pixels in [0, 1] to logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from bench import workdir
from cloud.build import int8_members, onnx_export, portfolio
from cloud.build.methods.structured import StructuredConfig
from cloud.build.store import FLOAT32, INT8, PortfolioStore, StoreError, VariantEntry
from cloud.build.train import TrainConfig
from common import datasets
from common.errors import PrunefleetError
from common.profiling import LatencySpread, measure_interleaved
from common.wire import pixels_to_unit
from edge import backends
from edge.backends.base import Artifact, BackendSettings
from edge.variants import LoadedVariant, VariantInfo

if TYPE_CHECKING:
    from bench.suites.backends import Plan, PortfolioPlan

log = logging.getLogger(__name__)
TORCH, ORT_FP32, ORT_INT8 = "torch", "ort_fp32", "ort_int8"  # the forms of a variant, as the record names them
ACCURACY_BATCH = 256  # test images per forward pass while accuracies are measured
TOLERANCE = onnx_export.ExportConfig().atol  # an ONNX file's logits against torch's, as the export checks them


def build_portfolio(plan: PortfolioPlan, work: Path, data_dir: Path | None, threads: int) -> tuple[PortfolioStore, str]:
    """The portfolio of `plan` in the work directory, built once (`portfolio build --method structured
    --int8`; an interrupted build resumes), then any int8 member still missing added as `portfolio
    quantize` adds it (nothing is rewritten when none is). A build the method refuses (a speedup it
    cannot reach on this model and CPU) is recorded and its message returned ("" for a built one)."""
    store = PortfolioStore(work / f"portfolio-{plan.name}")
    (work / plan.name).mkdir(parents=True, exist_ok=True)
    record = workdir.cached(work / plan.name, "build", lambda: _build(plan, store, data_dir, threads))
    if record["refused"]:
        return store, record["refused"]
    _, added = int8_members.add_int8(int8_members.QuantizeSettings(store.root, data_dir, threads))
    if added:
        log.info("%s: %d int8 members added", plan.name, added)
    return store, ""


def _build(plan: PortfolioPlan, store: PortfolioStore, data_dir: Path | None, threads: int) -> dict:
    try:
        store.manifest()
        return {"refused": ""}
    except StoreError:
        pass
    config = portfolio.BuildConfig(
        out=store.root,
        method="structured",
        model=plan.model,
        width=plan.width,
        data_dir=data_dir,
        subset=plan.subset,
        threads=threads,
        device="cpu",
        int8=True,
        train=TrainConfig(epochs=plan.epochs, batch_size=plan.batch_size, progress=False),
        method_settings=StructuredConfig(speedups=plan.speedups, finetune_epochs=plan.finetune_epochs),
    )
    try:
        portfolio.build(config)
    except PrunefleetError as err:
        if not isinstance(err, ValueError):  # a failed step, not a refused request
            raise
        log.warning("%s: the build refused: %s", plan.name, err)
        return {"refused": str(err)}
    return {"refused": ""}


@dataclass(frozen=True)
class Forms:
    """One float32 variant's forms as an edge holds them: torch, its ONNX file, and its int8 member's
    (None when it has none), with the manifest's entries."""

    entry: VariantEntry
    int8_entry: VariantEntry | None
    served: dict[str, LoadedVariant]


def _loaded(backend, entry: VariantEntry, artifact: Artifact, path: Path) -> LoadedVariant:
    info = VariantInfo(entry.variant_id, entry.name, entry.accuracy, artifact.size_bytes, entry.params, entry.precision)
    return backend.loader(info, artifact, path)()


def load_forms(store: PortfolioStore, threads: int) -> list[Forms]:
    """Every float32 variant of the store with an ONNX file, each form made ready as an edge makes it."""
    settings = BackendSettings(threads=threads, max_batch=ACCURACY_BATCH)
    torch_backend = backends.create(backends.TORCH, settings)
    ort_backend = backends.create(backends.ONNXRUNTIME, settings)
    manifest = store.manifest()
    children = {e.parent: e for e in manifest.variants if e.precision == INT8}
    forms = []
    for entry in (e for e in manifest.variants if e.precision == FLOAT32 and e.onnx_id):
        safetensors = Artifact(entry.variant_id, entry.size_bytes, b"", ".safetensors")
        onnx = Artifact(entry.onnx_id, entry.onnx_bytes or 0, b"", ".onnx")
        served = {
            TORCH: _loaded(torch_backend, entry, safetensors, store.variant_path(entry.variant_id)),
            ORT_FP32: _loaded(ort_backend, entry, onnx, store.onnx_path(entry.onnx_id)),
        }
        child = children.get(entry.variant_id)
        if child is not None:
            int8 = Artifact(child.onnx_id, child.onnx_bytes or 0, b"", ".onnx")
            served[ORT_INT8] = _loaded(ort_backend, child, int8, store.onnx_path(child.onnx_id))
        forms.append(Forms(entry, child, served))
    return forms


class _Served(nn.Module):
    """A form as a module, so that `measure_interleaved` times it like any model: the round's batch
    (a float32 tensor) goes to the form's `forward` as a numpy view, no copy."""

    def __init__(self, variant: LoadedVariant) -> None:
        super().__init__()
        self.variant = variant

    def forward(self, x):
        return self.variant.forward(x.numpy())


def _key(form: Forms, name: str) -> str:
    return f"{form.entry.variant_id}/{name}"


def _spread(spread: LatencySpread) -> dict:
    return {"p50_ms": spread.p50_ms, "q1_ms": spread.q1_ms, "q3_ms": spread.q3_ms, "rounds": spread.rounds}


def time_forms(forms: list[Forms], plan: Plan) -> dict:
    """Every form of every variant, at each batch of the plan, in the same interleaved rounds:
    {variant id: {form: {"b<batch>": spread}}}."""
    models = {_key(f, name): _Served(v) for f in forms for name, v in f.served.items()}
    shape = tuple(forms[0].served[TORCH].spec.input_shape)
    timed: dict = {f.entry.variant_id: {name: {} for name in f.served} for f in forms}
    for batch, iters in zip(plan.batches, plan.iters):
        log.info("timing %d forms at batch %d", len(models), batch)
        spreads = measure_interleaved(models, shape, batch, iters=iters, rounds=plan.rounds)
        for form in forms:
            for name in form.served:
                timed[form.entry.variant_id][name][f"b{batch}"] = _spread(spreads[_key(form, name)])
    return timed


def _logits(variant: LoadedVariant, images: np.ndarray) -> np.ndarray:
    parts = [
        variant.forward(pixels_to_unit(images[start : start + ACCURACY_BATCH]))
        for start in range(0, len(images), ACCURACY_BATCH)
    ]
    return np.concatenate(parts)


def accuracies(form: Forms, test: datasets.Split) -> dict:
    """Each form's accuracy on `test` (the full test split), the manifest's beside it, and the ONNX
    file's logits against torch's on every image (max abs diff, argmax disagreements)."""
    images, labels = test.images.numpy(), test.labels.numpy()
    logits = {name: _logits(variant, images) for name, variant in form.served.items()}
    figures = {name: {"accuracy": float((out.argmax(1) == labels).mean())} for name, out in logits.items()}
    figures[TORCH]["manifest_accuracy"] = form.entry.accuracy
    if form.int8_entry is not None:
        figures[ORT_INT8]["manifest_accuracy"] = form.int8_entry.accuracy
    diff = float(np.abs(logits[ORT_FP32] - logits[TORCH]).max())
    figures[ORT_FP32] |= {
        "max_abs_diff": diff,
        "argmax_disagreements": int((logits[ORT_FP32].argmax(1) != logits[TORCH].argmax(1)).sum()),
        "matches_torch": diff <= TOLERANCE,
        "test_images": len(labels),
    }
    return figures


def variant_record(form: Forms, timed: dict, figures: dict, batches: tuple[int, ...]) -> dict:
    """One variant's record: its forms' latencies and accuracies, and what the summary reads from them
    (each ratio of this run's own p50s, each accuracy drop of this run's own accuracies)."""
    torch_ms, fp32_ms = timed[TORCH], timed[ORT_FP32]
    int8_ms = timed.get(ORT_INT8)
    entry = form.entry
    record = {
        "variant_id": entry.variant_id,
        "name": entry.name,
        "params": entry.params,
        "macs": entry.macs,
        "speedup_b1": entry.speedup_b1,  # the manifest's, against the portfolio's dense model
        "int8": form.int8_entry.variant_id if form.int8_entry else None,
        "latency": timed,
        TORCH: figures[TORCH],
        ORT_FP32: figures[ORT_FP32],
        ORT_INT8: figures.get(ORT_INT8),
        "ort_vs_torch": {f"b{b}": torch_ms[f"b{b}"]["p50_ms"] / fp32_ms[f"b{b}"]["p50_ms"] for b in batches},
        "int8_vs_fp32": {f"b{b}": fp32_ms[f"b{b}"]["p50_ms"] / int8_ms[f"b{b}"]["p50_ms"] for b in batches}
        if int8_ms
        else {},
        "int8_acc_drop_pp": 100 * (figures[TORCH]["accuracy"] - figures[ORT_INT8]["accuracy"]) if int8_ms else None,
    }
    return record


def measure(store: PortfolioStore, plan: Plan, test: datasets.Split, work: Path, threads: int) -> dict:
    """One portfolio: its forms loaded, timed together (kept in `work`: a rerun times nothing again)
    and their accuracies measured."""
    work.mkdir(parents=True, exist_ok=True)
    forms = load_forms(store, threads)
    if not forms:
        raise StoreError(f"portfolio {store.root.name} has no float32 variant with an ONNX file")
    timed = workdir.cached(work, "timing", lambda: time_forms(forms, plan))
    figures = workdir.cached(work, "accuracy", lambda: {f.entry.variant_id: accuracies(f, test) for f in forms})
    manifest = store.manifest()
    return {
        "portfolio_id": manifest.portfolio_id,
        "members": len(manifest.variants),
        "variants": [
            variant_record(f, timed[f.entry.variant_id], figures[f.entry.variant_id], plan.batches) for f in forms
        ],
    }
