"""What `bench.suites.backends` measures outside one process: a real edge agent's resident memory per
backend, the installed size of each edge flavour, and the CPU's int8 instructions.

- Edge RSS: a plaintext cloud serves the portfolio; for each backend in turn an agent
  (`prunefleet-edge run --backend NAME`) starts, fetches, verifies, loads and profiles every member its
  backend serves (no memory budget: all of them stay resident), and once the coordinator has its profile
  of each, its VmRSS (and VmHWM) is read from /proc. Whether libtorch is mapped into it is recorded too:
  an ONNX Runtime agent imports no torch.
- Installed size: the distributions in the dependency closure of `prunefleet[edge]` and
  `prunefleet[edge-onnx]` as this environment has them installed (`importlib.metadata`: each
  distribution's `requires`, markers evaluated here, extras followed), each one's files as they are on
  disk. The project's own distribution is left out (the same in both); a requirement not installed
  here (torch's CUDA libraries beside a CPU build) is listed, not counted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cloud.admin import operator_client
from cloud.build.store import FLOAT32, PortfolioStore
from cloud.localfleet import commands, processes
from common.profiling import CPUINFO, cpu_model
from common.security import Transport

log = logging.getLogger(__name__)
PROJECT = "prunefleet"
FLAVOURS = {"torch": "edge", "onnxruntime": "edge-onnx"}  # backend -> the extra that installs its edge
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
GPU_LIBRARIES = ("nvidia-", "cuda-", "triton")  # distributions torch pulls in on Linux for GPUs an edge may lack
PLAIN = Transport.plaintext()
MB = 1e6
PROFILED_TIMEOUT_S = 900.0
STATUS = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


def cpu_int8(cpuinfo: Path = CPUINFO) -> dict:
    """The CPU's name, which of `INT8_FLAGS` it has, whether int8 kernels have VNNI or AMX to run on,
    and if not, why the int8 speedup target is not judged."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = set(line.partition(":")[2].split())
    found = {flag: flag in flags for flag in INT8_FLAGS}
    int8 = any(found.values())
    reason = "" if int8 else f"this CPU has none of {', '.join(INT8_FLAGS)}: int8 convolutions run without VNNI"
    return {"model": cpu_model(cpuinfo), "flags": found, "int8": int8, "reason": reason}


def _closure(extras: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """The installed distributions `prunefleet[extras]` needs, itself aside, and those it names that
    are not installed here."""
    wanted: dict[str, set[str]] = {}
    missing: set[str] = set()
    pending = [(PROJECT, set(extras))]
    while pending:
        name, asked = pending.pop()
        key = canonicalize_name(name)
        if key in wanted and asked <= wanted[key]:
            continue
        wanted[key] = wanted.get(key, set()) | asked
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            missing.add(key)
            continue
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *wanted[key])):
                pending.append((requirement.name, set(requirement.extras)))
    installed = set(wanted) - missing - {canonicalize_name(PROJECT)}
    return installed, missing


def _installed_bytes(name: str) -> int:
    """The sizes of a distribution's installed files as they are on disk (each file once)."""
    dist = metadata.distribution(name)
    paths = {Path(dist.locate_file(f)).resolve() for f in dist.files or ()}
    return sum(p.stat().st_size for p in paths if p.is_file())


def environment_sizes() -> dict:
    """Each edge flavour's installed size in MB, per distribution, and `edge_env_ratio` (the torch
    edge's over the ONNX Runtime edge's); beside it the same without torch's GPU libraries (what a
    CPU-only torch build would leave out), so that the ratio is not read as theirs alone."""
    sizes = {}
    for extra in FLAVOURS.values():
        installed, missing = _closure((extra,))
        per = {name: _installed_bytes(name) for name in sorted(installed)}
        sizes[extra] = {
            "mb": sum(per.values()) / MB,
            "mb_without_gpu_libraries": sum(v for k, v in per.items() if not k.startswith(GPU_LIBRARIES)) / MB,
            "distributions": {name: size / MB for name, size in per.items()},
            "not_installed": sorted(missing),
        }
    torch_edge, ort_edge = sizes[FLAVOURS["torch"]], sizes[FLAVOURS["onnxruntime"]]
    sizes["edge_env_ratio"] = torch_edge["mb"] / ort_edge["mb"]
    sizes["edge_env_ratio_without_gpu_libraries"] = (
        torch_edge["mb_without_gpu_libraries"] / ort_edge["mb_without_gpu_libraries"]
    )
    return sizes


def _status(pid: int) -> dict:
    values = dict(STATUS.findall(Path(f"/proc/{pid}/status").read_text()))
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        "vmrss_mb": int(values["VmRSS"]) * 1024 / MB,
        "vmhwm_mb": int(values["VmHWM"]) * 1024 / MB,
        "libtorch_mapped": "libtorch" in maps,
    }


def _held(cloud: str, edge: str, count: int, timeout_s: float) -> None:
    """Wait until the coordinator has the edge's profile of each of its `count` members."""
    stub = operator_client.coordinator_stub(cloud, PLAIN)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = next((e for e in operator_client.fleet(stub).edges if e.edge == edge), None)
        if status is not None and len(status.profiles) >= count and status.telemetry.active_variant:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{edge} did not profile its {count} members within {timeout_s:.0f} s")


def edge_rss(store: PortfolioStore, work: Path, threads: int) -> dict:
    """Per backend: a real edge agent holding every member it serves, its VmRSS and VmHWM in MB, the
    members it holds, and whether libtorch is mapped into it."""
    members = store.manifest().variants
    counts = {"torch": sum(e.precision == FLOAT32 for e in members), "onnxruntime": len(members)}
    run = work / f"edges-{store.root.name}"
    cloud = processes.start("cloud", commands.cloud_args(store.root, db=run / "fleet.sqlite", certs=None), run)
    try:
        out = {}
        for backend, count in counts.items():
            name = f"edge-{backend}"
            args = commands.edge_args(
                cloud.address, name, cache=run / name, certs=None, threads=threads, extra=("--backend", backend)
            )
            edge = processes.start(name, args, run, timeout_s=300)
            try:
                _held(cloud.address, name, count, PROFILED_TIMEOUT_S)
                time.sleep(1.0)  # the last member's profile is reported; let its load settle
                out[backend] = {"members": count, **_status(edge.process.pid)}
            finally:
                edge.stop()
            log.info("%s edge: %s", backend, out[backend])
    finally:
        cloud.stop()
    return out
