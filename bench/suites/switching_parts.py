"""Pieces of the switching benchmark: percentiles, each compact variant's ONNX file and the loaders of
both backends, and an InferenceService on loopback with clients."""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from cloud.build import onnx_export
from cloud.build.compaction import surgery
from cloud.build.methods import masks as masking
from cloud.build.train import apply_masks
from common import models, variant
from common.files import atomic_write_json, sha256_bytes, sha256_file, short_id
from common.onnx_format import FLOAT32
from common.wire import GRPC_OPTIONS, from_proto
from edge.backends import ONNXRUNTIME, TORCH
from edge.backends.base import Artifact, BackendSettings
from edge.backends.ort import OrtBackend
from edge.loading import cache_loader
from edge.metrics import EdgeMetrics
from edge.runtime import Runtime
from edge.server import InferenceServicer, make_server, set_serving
from edge.telemetry import RequestWindow
from edge.variants import Loader, VariantInfo
from protos import inference_pb2_grpc

log = logging.getLogger(__name__)
SHAPE = (3, 32, 32)  # the portfolio's input
WORKERS = 16  # the agent's gRPC worker threads (`AgentConfig.workers`)


def percentiles(samples: list[float]) -> dict:
    p50, p95, p99 = np.percentile(np.asarray(samples), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(samples)), "n": len(samples)}


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


def onnx_files(entries: list[dict], work: Path, check_inputs: int = 16) -> None:
    """Each entry's compact variant as the cloud exports it (`cloud.build.onnx_export`: exported, then
    checked against the torch model), stored in `work` under its sha256; `entry["onnx"]` names the
    file. Kept for a rerun."""
    for entry in entries:
        if Path(entry.get("onnx", "")).is_file():
            continue
        path = Path(entry["compact"])
        held = variant.load(path)
        data = onnx_export.export(held.model, held.spec, sha256_file(path))
        torch.manual_seed(0)
        onnx_export.check(data, held.model.eval(), torch.randn(check_inputs, *held.spec.input_shape))
        target = work / f"{sha256_bytes(data)}.onnx"
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        entry["onnx"] = str(tmp.rename(target))


def loaders(entries: list[dict], backend: str, threads: int, kind: str = "compact") -> list[tuple[VariantInfo, Loader]]:
    """How an agent of `backend` loads each entry: torch from its variant file of `kind` (optimized),
    ONNX Runtime from the compact variant's ONNX file (checked to be that variant, warmed up)."""
    made = []
    for entry in entries:
        path = Path(entry[kind])
        info = VariantInfo(sha256_file(path), short_id(path.stem), 0.0, path.stat().st_size, entry[f"params_{kind}"])
        if backend == TORCH:
            made.append((info, cache_loader(info, path)))
            continue
        assert backend == ONNXRUNTIME and kind == "compact", "ONNX Runtime serves the compact variants"
        onnx = Path(entry["onnx"])
        artifact = Artifact(onnx.stem, onnx.stat().st_size, b"", ".onnx")
        ort = OrtBackend(BackendSettings(threads=threads))
        info = VariantInfo(info.variant_id, info.name, 0.0, ort.held_bytes(artifact), info.params, FLOAT32)
        made.append((info, ort.loader(info, artifact, onnx)))
    return made


def servicer(runtime: Runtime) -> InferenceServicer:
    """The agent's InferenceService over `runtime`, with a window and metrics of its own."""
    return InferenceServicer(
        runtime, RequestWindow(time.monotonic()), EdgeMetrics(CollectorRegistry(), "bench", slo_s=0.05)
    )


class Served:
    """The runtime behind a real gRPC server on loopback, and a channel to it."""

    def __init__(self, runtime: Runtime, interceptors: tuple = ()):
        self.runtime, self.interceptors = runtime, interceptors

    def __enter__(self) -> Served:
        self.servicer = servicer(self.runtime)
        self.server, port, health = make_server(
            self.servicer, "127.0.0.1", 0, workers=WORKERS, interceptors=self.interceptors
        )
        set_serving(health, True)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()
        self.server.stop(0).wait()

    def hammer(self, clients: int, request, expected: dict, work: Callable[[], int]) -> dict:
        """Clients send `request` until `work` returns; each answer must equal `expected[variant_id]`."""
        stop, lock = threading.Event(), threading.Lock()
        counts = {"answered": 0, "failed": 0, "wrong": 0, "by_variant": {}}

        def client():
            while not stop.is_set():
                try:
                    reply = self.stub.Predict(request, timeout=30)
                    ok = np.allclose(from_proto(reply.output), expected[reply.variant_id], atol=1e-4)
                    with lock:
                        counts["answered"] += 1
                        counts["wrong"] += not ok
                        counts["by_variant"][short_id(reply.variant_id)] = (
                            counts["by_variant"].get(short_id(reply.variant_id), 0) + 1
                        )
                except grpc.RpcError:
                    with lock:
                        counts["failed"] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            counts["switches"] = work()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        return counts
