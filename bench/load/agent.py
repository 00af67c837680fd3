"""The agent's share of the load benchmark: Predict at saturation, and memory over many switches.

`saturate`: one real edge agent process (`prunefleet-edge run`, mutual TLS, its portfolio fetched from
the real cloud) under closed-loop Predict from more clients than it has inference slots, each sending
one real Fashion-MNIST test image per request and the next as soon as the answer comes. Reported:
answers per second, client-side p50/p99, failures by status code (RESOURCE_EXHAUSTED from
`--max-pending` counted apart from real failures) and the agent's RSS before, during and after.

`switch_memory`: `bench.probes.switches` in a fresh process (the runtime an agent uses), its RSS curve
over N switches with every variant resident, and over on-demand switches under a memory budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

from cloud.admin import certs
from cloud.localfleet import commands, processes
from common.files import short_id
from common.security import Transport
from common.wire import to_proto
from protos import inference_pb2, inference_pb2_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.name


class Periodic:
    """A thread that calls `sample()` every `every_s` seconds while the `with` block runs (after
    `begin()` once); `sample` returns False to stop early."""

    def __init__(self, every_s: float):
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def begin(self) -> None:
        pass

    def sample(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        self.begin()
        while not self._stop.wait(self._every_s):
            if self.sample() is False:
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class RssSampler(Periodic):
    """Resident memory (and CPU share) of a process, sampled every `every_s` seconds in a thread."""

    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(every_s)
        self._process = psutil.Process(pid)
        self.samples: list[tuple[float, int, float]] = []  # (seconds since start, rss bytes, cpu percent)

    def begin(self) -> None:
        self._start = time.monotonic()
        self._process.cpu_percent()

    def sample(self) -> bool:
        try:
            self.samples.append(
                (round(time.monotonic() - self._start, 2), self._process.memory_info().rss, self._process.cpu_percent())
            )
        except psutil.Error:
            return False
        return True


def start_agent(cloud_address: str, edge_certs: Path, run_dir: Path, threads: int, name: str = "edge-load"):
    args = commands.edge_args(cloud_address, name, cache=run_dir / "cache" / name, certs=edge_certs, threads=threads)
    return processes.start(name, args, run_dir / "logs")


def _wait_ready(predict, request, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            predict(request, timeout=10)
            return
        except grpc.RpcError:
            time.sleep(0.5)
    raise RuntimeError("the agent never answered a Predict")


def _closed_loop(predict, requests: list, seconds: float, clients: int) -> list[tuple[float, str, str]]:
    """(latency ms, status code name, variant id) of every request sent by `clients` closed loops."""
    outcomes: list[tuple[float, str, str]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        mine, i = [], index
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                reply = predict(requests[i % len(requests)], timeout=30)
                mine.append(((time.perf_counter() - start) * 1e3, "OK", reply.variant_id))
            except grpc.RpcError as err:
                mine.append(((time.perf_counter() - start) * 1e3, err.code().name, ""))
            i += clients
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def saturate(cloud_address: str, keys: dict, run_dir: Path, images: np.ndarray, plan: dict) -> dict:
    """`keys` as `certs.init` returns them: the agent gets an edge certificate of its own, the load the
    client's (an edge serves Predict to client certificates only)."""
    edge_certs = certs.issue_holder(keys["cloud"].parent, "edge", "edge-load")
    agent = start_agent(cloud_address, edge_certs, run_dir, plan["agent_threads"])
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(Transport.load(keys["client"]).channel(agent.address))
        requests = [inference_pb2.PredictRequest(input=to_proto(images[i : i + 1])) for i in range(len(images))]
        _wait_ready(stub.Predict, requests[0])
        _closed_loop(stub.Predict, requests, plan["warmup_s"], plan["clients"])  # torch's first passes, caches
        rss_before = psutil.Process(agent.process.pid).memory_info().rss
        with RssSampler(agent.process.pid) as sampler:
            outcomes = _closed_loop(stub.Predict, requests, plan["predict_s"], plan["clients"])
        rss_after = psutil.Process(agent.process.pid).memory_info().rss
    finally:
        agent.stop()
    ok = [latency for latency, code, _ in outcomes if code == "OK"]
    codes: dict[str, int] = {}
    for _, code, _ in outcomes:
        codes[code] = codes.get(code, 0) + 1
    variants: dict[str, int] = {}
    for _, code, variant_id in outcomes:
        if code == "OK":
            variants[short_id(variant_id)] = variants.get(short_id(variant_id), 0) + 1
    return {
        "seconds": plan["predict_s"],
        "clients": plan["clients"],
        "slots": plan["agent_threads"],
        "requests": len(outcomes),
        "answered": len(ok),
        "per_s": len(ok) / plan["predict_s"],
        "p50_ms": float(np.percentile(ok, 50)) if ok else 0.0,
        "p99_ms": float(np.percentile(ok, 99)) if ok else 0.0,
        "codes": codes,
        "failed": sum(n for code, n in codes.items() if code not in ("OK", EXHAUSTED)),
        "resource_exhausted": codes.get(EXHAUSTED, 0),
        "answered_by": variants,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_curve": [[t, rss] for t, rss, _ in sampler.samples],
        "cpu_percent_mean": float(np.mean([c for _, _, c in sampler.samples])) if sampler.samples else 0.0,
    }


def switch_memory(
    files: list[Path], switches: int, every: int, data_dir: Path | None, budget_bytes: int = 0, *, portfolio: Path
) -> dict:
    """`bench.probes.switches` over `files` of the portfolio in `portfolio`, answering its own inputs."""
    args = [
        sys.executable,
        "-m",
        "bench.probes.switches",
        "--portfolio",
        str(portfolio),
        "--files",
        *map(str, files),
        "--switches",
        str(switches),
        "--every",
        str(every),
        "--budget-bytes",
        str(budget_bytes),
    ]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"switch probe failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
