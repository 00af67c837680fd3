"""Every member of a portfolio timed with its dense model, in the same interleaved rounds, and compared
with it.

A float32 variant is timed twice: served by torch as an edge serves it (`common.inference`), which
gives its `latency_ms_*` figures, and, when it has an ONNX file, that file served by ONNX Runtime
(`ort_latency_ms_*`). An int8 member is served by ONNX Runtime alone (its `latency_ms_*`). The dense
model is served by torch. All of them share the rounds of `common.profiling.measure_interleaved`, so
every speedup against the dense model compares figures the same machine load shaped. ONNX Runtime
sessions take part as `OrtServed` modules, which pass the round's batch to the session as it is (the
tensor's memory, no copy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from cloud.build.store import DenseEntry, VariantEntry
from common.onnx_format import INPUT, OUTPUT
from common.profiling import LatencySpread, measure_interleaved

TIMED = ((1, 4), (32, 2))  # batch sizes timed, and timed runs per round at each
DENSE = "dense"  # the dense model's key among the timed models (member ids are sha256 hex)
ORT_KEY = "{}/onnxruntime"  # a float32 variant's ONNX file among the timed models
QUARTILE_FIELDS = ("latency_ms_b1_q1", "latency_ms_b1_q3", "latency_ms_b32_q1", "latency_ms_b32_q3")
LATENCY_FIELDS = ("latency_ms_b1", *QUARTILE_FIELDS[:2], "latency_ms_b32", *QUARTILE_FIELDS[2:])
COMPARISON_FIELDS = ("acc_delta_pp", "speedup_b1", "speedup_b32", "macs_ratio", "ort_speedup_b1", "ort_speedup_b32")


class OrtServed(nn.Module):
    """An ONNX Runtime session as a module, so it is timed like the torch models: `forward` runs the
    session on the batch and returns its logits (a numpy array)."""

    def __init__(self, session) -> None:
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor):
        return self.session.run([OUTPUT], {INPUT: x.numpy()})[0]


@dataclass(frozen=True)
class Member:
    """A portfolio member ready to time: its entry, the model that serves it (torch for a float32
    variant, `OrtServed` for an int8 member) and, for a float32 variant with an ONNX file, that file
    served by ONNX Runtime."""

    entry: VariantEntry
    served: nn.Module
    ort: nn.Module | None = None


def untimed(entry: VariantEntry) -> VariantEntry:
    """`entry` with every latency and every comparison with the dense model cleared (None, and the
    two required latencies 0), as it is before it is timed."""
    cleared = dict.fromkeys((*QUARTILE_FIELDS, *COMPARISON_FIELDS, *(f"ort_{name}" for name in LATENCY_FIELDS)))
    return replace(entry, latency_ms_b1=0.0, latency_ms_b32=0.0, **cleared)


def _latencies(spreads: dict[int, dict[str, LatencySpread]], key: str, prefix: str = "") -> dict[str, float]:
    b1, b32 = spreads[1][key], spreads[32][key]
    figures = (b1.p50_ms, b1.q1_ms, b1.q3_ms, b32.p50_ms, b32.q1_ms, b32.q3_ms)
    return {prefix + name: value for name, value in zip(LATENCY_FIELDS, figures)}


def compared(entry: VariantEntry, dense: DenseEntry) -> VariantEntry:
    """`entry` against the timed dense model: accuracy points gained, speedups (of the backend that
    serves it, and of its ONNX file under ONNX Runtime when it has one), MACs ratio."""
    ort_b1, ort_b32 = entry.ort_latency_ms_b1, entry.ort_latency_ms_b32
    return replace(
        entry,
        acc_delta_pp=100 * (entry.accuracy - dense.accuracy),
        speedup_b1=dense.latency_ms_b1 / entry.latency_ms_b1,
        speedup_b32=dense.latency_ms_b32 / entry.latency_ms_b32,
        macs_ratio=dense.macs / entry.macs if entry.macs else None,
        ort_speedup_b1=dense.latency_ms_b1 / ort_b1 if ort_b1 else None,
        ort_speedup_b32=dense.latency_ms_b32 / ort_b32 if ort_b32 else None,
    )


def time_members(
    members: list[Member], shape: tuple, dense: tuple[DenseEntry, nn.Module] | None
) -> tuple[list[VariantEntry], DenseEntry | None]:
    """Every member's latency at batch 1 and 32 (and its ONNX file's, for a float32 variant that has
    one), and the dense model's, timed together in interleaved rounds once all are built: timed one by
    one as each is derived, minutes apart, the machine's load of the moment would rank members against
    each other and against the dense model. The quartiles say where two cannot be told apart. Each
    member is then `compared` with the dense model."""
    models = {m.entry.variant_id: m.served for m in members}
    models.update({ORT_KEY.format(m.entry.variant_id): m.ort for m in members if m.ort is not None})
    if dense is not None:
        models[DENSE] = dense[1]
    if not models:
        return [], None
    spreads = {batch: measure_interleaved(models, tuple(shape), batch, iters=iters) for batch, iters in TIMED}
    timed = []
    for member in members:
        entry, key = untimed(member.entry), member.entry.variant_id
        ort = _latencies(spreads, ORT_KEY.format(key), "ort_") if member.ort is not None else {}
        timed.append(replace(entry, **_latencies(spreads, key), **ort))
    if dense is None:
        return timed, None
    reference = replace(dense[0], **_latencies(spreads, DENSE))
    return [compared(entry, reference) for entry in timed], reference
