"""`prunefleet bench switching`: switching in memory against reloading from disk, in one run.

The portfolio: VGG-16 on 3x32x32 with random-init weights, pruned by global magnitude at several
sparsities and compacted by surgery (checked equal to the sparse model). Accuracy plays no part here
(the weights are untrained); only sizes and times matter. The same variants are also written as
sparse dense-shaped files (the pruned zeros kept), for the memory comparison. Cached in the work dir.

(a) switch latency in memory (`Runtime.switch` to a resident variant, timed around the call) against
    a reload from disk (read the file, rebuild the model, load its weights, swap), alternating blocks;
(b) switches while client threads send Predicts over gRPC on loopback to a server in this process;
    every answer is checked against the outputs of the variant that claims it;
(c) resident memory growth of a fresh process holding the whole portfolio, compact against sparse
    (`bench.probes.memory`), next to the parameter bytes each holds, served optimized as an agent does
    by default and, beside it, as loaded; and under a memory budget, the
    peak during each switch (on-demand loads included) above the RSS just before it;
(d) Predict over gRPC against the same model called in process, batch 1, alternating blocks, and
    where a Predict's time goes beyond its forward pass, step by step (`bench.suites.grpc_steps`).

(a), (b) and (d) run on both of the edge's backends: torch (summary keys as they were) and ONNX
Runtime (the same compact variants exported and checked as the cloud does, `cloud.build.onnx_export`,
served by `edge.backends.ort`; keys suffixed `_ort`). (c) is torch's: `prunefleet bench backends`
measures an ONNX Runtime agent's memory. Inference runs on `threads` intra-op threads (1, the edge
agent's default), the gRPC server on the agent's 16 worker threads.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.suites import grpc_steps
from bench.suites.switching_parts import SHAPE, Served, build_portfolio, loaders, onnx_files, percentiles
from common import variant
from common.files import atomic_write_json
from common.wire import to_proto
from edge.backends import ONNXRUNTIME, TORCH
from edge.runtime import Runtime, RuntimeConfig
from edge.variants import VariantInfo, loaded
from protos import inference_pb2

log = logging.getLogger(__name__)
FULL = {
    "model": "vgg16",
    "width": 1.0,
    "sparsities": (0.95, 0.97, 0.98, 0.99, 0.995),
    "switches": 5000,
    "reloads": 60,
    "concurrent_switches": 1000,
    "clients": 2,
    "grpc_requests": 600,
    "peak_switches": 10,
    "threads": 1,
}
QUICK = {
    "model": "vgg16",
    "width": 1.0,
    "sparsities": (0.95, 0.98, 0.99),
    "switches": 1000,
    "reloads": 15,
    "concurrent_switches": 1000,
    "clients": 2,
    "grpc_requests": 150,
    "peak_switches": 4,
    "threads": 1,
}
ROUNDS = 5


def _runtime(entries: list[dict], plan: dict, backend: str = TORCH, kind: str = "compact", slots: int = 1) -> Runtime:
    runtime = Runtime(RuntimeConfig(slots=slots))
    for _, loader in loaders(entries, backend, plan["threads"], kind):
        runtime.add(loader())
    runtime.switch(next(iter(runtime.variants())), "start")
    return runtime


def _reload(entries: list[dict], plan: dict, backend: str) -> list:
    """What a reload from disk does, per variant: torch reads the file, rebuilds the model and loads
    its weights, served as loaded (optimizing would make the baseline slower, the speedup larger);
    ONNX Runtime opens the file, checks it and warms a session up, as an on-demand load does."""
    if backend != TORCH:
        return [loader for _, loader in loaders(entries, backend, plan["threads"])]

    def reload(path: Path):
        held = variant.load(path)
        return loaded(VariantInfo("", "", 0.0, 0, 0), held.spec, held.model, optimize=False)

    return [lambda path=Path(e["compact"]): reload(path) for e in entries]


def switch_vs_reload(entries: list[dict], plan: dict, backend: str = TORCH) -> dict:
    """(a): in-memory switches and reloads from disk, in alternating blocks."""
    runtime = _runtime(entries, plan, backend)
    ids, reloads = list(runtime.variants()), _reload(entries, plan, backend)
    switch_us, reload_ms = [], []
    for _ in range(ROUNDS):
        for i in range(plan["switches"] // ROUNDS):
            start = time.perf_counter()
            runtime.switch(ids[i % len(ids)], "bench")
            switch_us.append((time.perf_counter() - start) * 1e6)
        for i in range(plan["reloads"] // ROUNDS):
            start = time.perf_counter()
            active = reloads[i % len(reloads)]()
            reload_ms.append((time.perf_counter() - start) * 1e3)
            del active
    return {
        "switch_us": percentiles(switch_us),
        "reload_ms": percentiles(reload_ms),
        "switches": len(switch_us),
        "reloads": len(reload_ms),
    }


def switches_under_load(entries: list[dict], plan: dict, backend: str = TORCH) -> dict:
    """(b): switches while clients send Predicts over gRPC; any failure or mixed answer counts."""
    runtime = _runtime(entries, plan, backend, slots=plan["clients"])
    pixels = np.random.default_rng(0).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    expected = {}
    for variant_id in runtime.variants():
        runtime.switch(variant_id, "bench")
        expected[variant_id] = runtime.predict(pixels)[0]
    request = inference_pb2.PredictRequest(input=to_proto(pixels))
    with Served(runtime) as served:
        counts = served.hammer(plan["clients"], request, expected, lambda: _switch_loop(runtime, plan))
    return counts


def _switch_loop(runtime: Runtime, plan: dict) -> int:
    ids = list(runtime.variants())
    for i in range(plan["concurrent_switches"]):
        runtime.switch(ids[i % len(ids)], "bench")
        time.sleep(0.002)  # let requests start on both sides of each switch
    return plan["concurrent_switches"]


def _probe(paths: list[str], budget: int = 0, switches: int = 0, as_loaded: bool = False) -> dict:
    args = [sys.executable, "-m", "bench.probes.memory", "--files", *paths, *(["--as-loaded"] if as_loaded else [])]
    if budget:
        args += ["--budget-bytes", str(budget), "--switches", str(switches)]
    done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(entries: list[dict], plan: dict) -> dict:
    """(c): RSS growth of a fresh process holding the portfolio, compact vs sparse, served as an agent
    serves them by default (optimized) and, beside it, as loaded; peaks during switches under a budget
    that holds the largest compact variant and a half."""
    compact = _probe([e["compact"] for e in entries])
    sparse = _probe([e["sparse"] for e in entries])
    as_loaded = {kind: _probe([e[kind] for e in entries], as_loaded=True) for kind in ("compact", "sparse")}
    biggest = max(Path(e["compact"]).stat().st_size for e in entries)
    budgeted = _probe([e["compact"] for e in entries], budget=int(1.5 * biggest), switches=plan["peak_switches"])
    peaks = budgeted.get("switches", [])
    return {
        "compact": compact,
        "sparse": sparse,
        "budget_bytes": int(1.5 * biggest),
        "switch_peaks": peaks,
        "memory_ratio": sparse["growth_bytes"] / compact["growth_bytes"],
        "as_loaded": as_loaded,
        "memory_ratio_as_loaded": as_loaded["sparse"]["growth_bytes"] / as_loaded["compact"]["growth_bytes"],
        "param_bytes_ratio": sparse["param_bytes"] / compact["param_bytes"],
        "switch_peak_over_two_variants": max((p["extra_bytes"] / p["two_variants_bytes"] for p in peaks), default=None),
        "switch_peak_over_serving_two_variants": max(
            (p["extra_over_serving_bytes"] / p["two_variants_bytes"] for p in peaks), default=None
        ),
    }


def grpc_overhead(entries: list[dict], plan: dict, backend: str = TORCH) -> dict:
    """(d): Predict over gRPC vs in process, batch 1, on the smallest compact variant (the overhead is
    what is measured; a short forward pass keeps the machine's noise on it small), in alternating
    blocks. `overhead_p50_ms` is per request: its round trip less its own forward pass (timed inside
    the server), the p50 over requests; `overhead_vs_loop_p50_ms` the round trips' p50 less the p50 of
    the same call in a tight loop, whose forward passes run warmer than those between round trips.
    Then each step apart (`bench.suites.grpc_steps`)."""
    runtime = _runtime(entries, plan, backend)
    smallest = min(runtime.resident().values(), key=lambda v: v.memory_bytes)
    forwards: list[tuple[float, float]] = []
    runtime.add(grpc_steps.timed(smallest, forwards))
    runtime.switch(smallest.variant_id, "bench")
    pixels = np.random.default_rng(1).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    request = inference_pb2.PredictRequest(input=to_proto(pixels))
    remote_ms, overhead_ms, local_ms = [], [], []
    block = max(1, plan["grpc_requests"] // (4 * ROUNDS))
    with Served(runtime) as served:
        for _ in range(4 * ROUNDS):
            for _ in range(block):
                forwards.clear()
                start = time.perf_counter()
                served.stub.Predict(request, timeout=30)
                remote_ms.append((time.perf_counter() - start) * 1e3)
                overhead_ms.append(remote_ms[-1] - (forwards[0][1] - forwards[0][0]) * 1e3)
            for _ in range(block):
                start = time.perf_counter()
                runtime.predict(pixels)
                local_ms.append((time.perf_counter() - start) * 1e3)
    runtime.add(smallest)
    runtime.switch(smallest.variant_id, "bench")
    grpc_p, local_p, overhead_p = percentiles(remote_ms), percentiles(local_ms), percentiles(overhead_ms)
    return {
        "grpc_ms": grpc_p,
        "in_process_ms": local_p,
        "overhead_ms": overhead_p,
        "overhead_p50_ms": overhead_p["p50"],
        "overhead_vs_loop_p50_ms": grpc_p["p50"] - local_p["p50"],
        "steps": grpc_steps.study(runtime, request, plan["grpc_requests"]),
    }


def summarize(a: dict, b: dict, c: dict, d: dict) -> dict:
    return {
        **_backend_summary(a, b, d),
        "memory_ratio": c["memory_ratio"],
        "param_bytes_ratio": c["param_bytes_ratio"],
        "memory_ratio_of_ideal": c["memory_ratio"] / c["param_bytes_ratio"],
        "memory_ratio_of_ideal_as_loaded": c["memory_ratio_as_loaded"] / c["param_bytes_ratio"],
        "switch_peak_over_two_variants": c["switch_peak_over_two_variants"],
        "switch_peak_over_serving_two_variants": c["switch_peak_over_serving_two_variants"],
    }


def _backend_summary(a: dict, b: dict, d: dict, suffix: str = "") -> dict:
    """The figures each backend has, under today's names (torch) or suffixed (`_ort`)."""
    figures = {
        "switch_p50_us": a["switch_us"]["p50"],
        "switch_p99_us": a["switch_us"]["p99"],
        "reload_p50_ms": a["reload_ms"]["p50"],
        "switch_speedup": a["reload_ms"]["p50"] * 1e3 / a["switch_us"]["p50"],
        "failed_requests": b["failed"],
        "wrong_answers": b["wrong"],
        "requests_during_switches": b["answered"],
        "grpc_overhead_p50_ms": d["overhead_p50_ms"],
        "grpc_overhead_vs_loop_p50_ms": d["overhead_vs_loop_p50_ms"],
    }
    return {f"{name}{suffix}": value for name, value in figures.items()}


def _ort(entries: list[dict], plan: dict, work: Path) -> dict:
    """(a), (b) and (d) on the ONNX Runtime backend: the same compact variants, exported and checked."""
    onnx_files(entries, work)
    a = switch_vs_reload(entries, plan, ONNXRUNTIME)
    log.info("ort: switch %s us, reload %s ms", a["switch_us"], a["reload_ms"])
    b = switches_under_load(entries, plan, ONNXRUNTIME)
    log.info("ort under load: %s", b)
    return {"switching": a, "under_load": b, "grpc": grpc_overhead(entries, plan, ONNXRUNTIME)}


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    plan = QUICK if quick else FULL
    work = Path(work or "runs/bench-switching.work")
    entries = build_portfolio(plan, work)
    torch.set_num_threads(plan["threads"])  # inference threads, as an edge agent runs by default
    a = switch_vs_reload(entries, plan)
    log.info("switch %s us, reload %s ms", a["switch_us"], a["reload_ms"])
    b = switches_under_load(entries, plan)
    log.info("under load: %s", b)
    c = memory(entries, plan)
    log.info("memory: compact %s, sparse %s", c["compact"], c["sparse"])
    d = grpc_overhead(entries, plan)
    ort = _ort(entries, plan, work)
    atomic_write_json(work / "portfolio.json", {"plan": plan, "variants": entries})  # with the ONNX files
    return {
        "note": "random-init weights: accuracy is not measured here, only sizes and times",
        "plan": dict(plan),
        "portfolio": entries,
        "switching": a,
        "under_load": b,
        "memory": c,
        "grpc": d,
        "onnxruntime": ort,
        "summary": {
            **summarize(a, b, c, d),
            **_backend_summary(ort["switching"], ort["under_load"], ort["grpc"], "_ort"),
        },
    }
