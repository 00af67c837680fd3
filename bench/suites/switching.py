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
(d) Predict over gRPC against the same model called in process, batch 1, alternating blocks.

Inference runs on `threads` intra-op threads (1, the edge agent's default).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.suites.switching_parts import Served, percentiles
from cloud.build.compaction import surgery
from cloud.build.methods import masks as masking
from cloud.build.train import apply_masks
from common import models, variant
from common.files import atomic_write_json, sha256_file, short_id
from common.wire import to_proto
from edge.loading import cache_loader
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
SHAPE = (3, 32, 32)
ROUNDS = 5


def _spec(plan: dict, sparsity: float, method: str) -> variant.VariantSpec:
    kwargs = {"in_channels": 3, "input_size": 32, "num_classes": 10, "width": plan["width"]}
    return variant.VariantSpec(
        arch=plan["model"],
        kwargs=kwargs,
        input_shape=SHAPE,
        num_classes=10,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        method=method,
        sparsity=sparsity,
        accuracy=0.0,
        name=f"{plan['model']}-s{sparsity}",
    )


def build_portfolio(plan: dict, work: Path) -> list[dict]:
    """Compact and sparse variant files per sparsity, cached in `work` for the same plan."""
    index = work / "portfolio.json"
    if index.exists():
        cached = json.loads(index.read_text())
        if cached["plan"] == json.loads(json.dumps(plan)) and all(
            Path(p).exists() for e in cached["variants"] for p in (e["compact"], e["sparse"])
        ):
            return cached["variants"]
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dense = models.build(plan["model"], _spec(plan, 0.0, "dense").kwargs).eval()
    example = torch.randn(1, *SHAPE)
    pairs = masking.conv_batchnorm_pairs(dense, example)
    entries = []
    for sparsity in plan["sparsities"]:
        masks = masking.prune_global_magnitude(dense, masking.dense_masks(dense), sparsity)
        sparse = copy.deepcopy(dense)
        apply_masks(sparse, masking.with_batchnorm_masks(masks, pairs))
        compact, report = surgery.compact(sparse, example, check_inputs=torch.randn(16, *SHAPE))
        paths = {}
        for kind, model in (("compact", compact), ("sparse", sparse)):
            tmp = work / f"{kind}-{sparsity}.tmp"
            sha = variant.save(model, _spec(plan, sparsity, "magnitude" if kind == "compact" else "sparse"), tmp)
            paths[kind] = str(tmp.rename(work / f"{sha}.safetensors"))
        entries.append(
            {
                "sparsity": sparsity,
                **paths,
                "params_compact": report.params_after,
                "params_sparse": models.count_params(sparse),
                "max_abs_diff": report.max_abs_diff,
            }
        )
        log.info("sparsity %.3f: %d -> %d params", sparsity, entries[-1]["params_sparse"], report.params_after)
    atomic_write_json(index, {"plan": plan, "variants": entries})
    return entries


def _runtime(entries: list[dict], kind: str = "compact", slots: int = 1) -> Runtime:
    runtime = Runtime(RuntimeConfig(slots=slots))
    for entry in entries:
        path = Path(entry[kind])
        info = VariantInfo(sha256_file(path), short_id(path.stem), 0.0, path.stat().st_size, entry[f"params_{kind}"])
        runtime.add(cache_loader(info, path)())
    runtime.switch(next(iter(runtime.variants())), "start")
    return runtime


def switch_vs_reload(entries: list[dict], plan: dict) -> dict:
    """(a): in-memory switches and reloads from disk, in alternating blocks."""
    runtime = _runtime(entries)
    ids, paths = list(runtime.variants()), [Path(e["compact"]) for e in entries]
    switch_us, reload_ms = [], []
    for _ in range(ROUNDS):
        for i in range(plan["switches"] // ROUNDS):
            start = time.perf_counter()
            runtime.switch(ids[i % len(ids)], "bench")
            switch_us.append((time.perf_counter() - start) * 1e6)
        for i in range(plan["reloads"] // ROUNDS):
            start = time.perf_counter()
            held = variant.load(paths[i % len(paths)])  # read the file, rebuild, load the weights
            # ready to serve, as loaded (optimizing would make the baseline slower, the speedup larger)
            active = loaded(VariantInfo("", "", 0.0, 0, 0), held.spec, held.model, optimize=False)
            reload_ms.append((time.perf_counter() - start) * 1e3)
            del active
    return {
        "switch_us": percentiles(switch_us),
        "reload_ms": percentiles(reload_ms),
        "switches": len(switch_us),
        "reloads": len(reload_ms),
    }


def switches_under_load(entries: list[dict], plan: dict) -> dict:
    """(b): switches while clients send Predicts over gRPC; any failure or mixed answer counts."""
    runtime = _runtime(entries, slots=plan["clients"])
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


def grpc_overhead(entries: list[dict], plan: dict) -> dict:
    """(d): Predict over gRPC vs in process, batch 1, on the smallest compact variant (the overhead is
    what is measured; a short forward pass keeps the machine's noise on it small)."""
    runtime = _runtime(entries)
    runtime.switch(min(runtime.resident().values(), key=lambda v: v.memory_bytes).variant_id, "bench")
    pixels = np.random.default_rng(1).integers(0, 256, (1, *SHAPE), dtype=np.uint8)
    request = inference_pb2.PredictRequest(input=to_proto(pixels))
    remote_ms, local_ms = [], []
    with Served(runtime) as served:
        for _ in range(4 * ROUNDS):
            for _ in range(plan["grpc_requests"] // (4 * ROUNDS)):
                start = time.perf_counter()
                served.stub.Predict(request, timeout=30)
                remote_ms.append((time.perf_counter() - start) * 1e3)
            for _ in range(plan["grpc_requests"] // (4 * ROUNDS)):
                start = time.perf_counter()
                runtime.predict(pixels)
                local_ms.append((time.perf_counter() - start) * 1e3)
    grpc_p, local_p = percentiles(remote_ms), percentiles(local_ms)
    return {"grpc_ms": grpc_p, "in_process_ms": local_p, "overhead_p50_ms": grpc_p["p50"] - local_p["p50"]}


def summarize(a: dict, b: dict, c: dict, d: dict) -> dict:
    return {
        "switch_p50_us": a["switch_us"]["p50"],
        "switch_p99_us": a["switch_us"]["p99"],
        "reload_p50_ms": a["reload_ms"]["p50"],
        "switch_speedup": a["reload_ms"]["p50"] * 1e3 / a["switch_us"]["p50"],
        "failed_requests": b["failed"],
        "wrong_answers": b["wrong"],
        "requests_during_switches": b["answered"],
        "memory_ratio": c["memory_ratio"],
        "param_bytes_ratio": c["param_bytes_ratio"],
        "memory_ratio_of_ideal": c["memory_ratio"] / c["param_bytes_ratio"],
        "memory_ratio_of_ideal_as_loaded": c["memory_ratio_as_loaded"] / c["param_bytes_ratio"],
        "switch_peak_over_two_variants": c["switch_peak_over_two_variants"],
        "switch_peak_over_serving_two_variants": c["switch_peak_over_serving_two_variants"],
        "grpc_overhead_p50_ms": d["overhead_p50_ms"],
    }


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
    return {
        "note": "random-init weights: accuracy is not measured here, only sizes and times",
        "plan": dict(plan),
        "portfolio": entries,
        "switching": a,
        "under_load": b,
        "memory": c,
        "grpc": d,
        "summary": summarize(a, b, c, d),
    }
