"""The *files* part of the fuzz: crafted and hypothesis-damaged variant files through the loading
paths, crafted download streams and path-like ids at the fetcher, and a real edge fetching crafted
files from a real cloud."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import numpy as np

from bench.fuzz import fleet as fuzz_fleet
from bench.fuzz.files import (
    check_file,
    crafted_files,
    entries,
    fetcher_ids,
    mutations,
    specs,
)
from bench.fuzz.fleet import (
    cache_problems,
    call,
    start_cloud,
    start_edge,
    wait_serving,
    write_store,
)
from bench.fuzz.rules import BY_NAME
from bench.fuzz.streams import check_stream, scripts
from cloud.admin import certs, operator_client
from cloud.localfleet import processes
from common.files import short_id
from common.security import Transport
from common.wire import to_proto
from protos import coordinator_pb2_grpc, inference_pb2

log = logging.getLogger(__name__)
AT_THE_EDGE = (
    "header not JSON",
    "header nested 100000 deep",
    "arch an import path outside the allow-list",
    "width infinite",
    "input_shape 100000x100000",
    "std NaN",
    "integer weight",
    "batchnorm statistics a scalar",
    "shapes that do not match",
    "declared size beyond the file",
)


class Tally:
    def __init__(self):
        self.cases, self.kinds, self.crashes = 0, {}, []

    def add(self, kind: str, what: str, problem: str | None) -> None:
        self.cases += 1
        entry = self.kinds.setdefault(kind, {"cases": 0, "crashes": 0})
        entry["cases"] += 1
        if problem:
            entry["crashes"] += 1
            self.crashes.append({"rpc": f"files/{kind}", "case": what, "problem": problem})
            log.warning("fuzz file %s (%s): %s", kind, what, problem)


def _refusals(log_path: Path, ids: list[str], timeout_s: float) -> set[str]:
    """The ids (as `short_id` prints them) the edge has logged as refused, waiting up to `timeout_s` for all."""
    deadline, found = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = {vid for vid in ids if f"variant {short_id(vid)} refused" in text}
        if len(found) == len(ids):
            break
        time.sleep(0.5)
    return found


def edge_fetches_crafted(good: bytes, bad: dict[str, bytes], work: Path, tally: Tally) -> None:
    """A real cloud serves one good and the crafted files (signed, as any listing); a real edge must
    serve the good one, refuse each crafted one by id, stay up, and keep only verified files."""
    keys = certs.init(work / "certs", force=True)
    store = write_store(work / "store", [good, *bad.values()])
    ids = [v.variant_id for v in store.manifest().variants]
    cloud = start_cloud(store.root, work, keys)
    edge = None
    try:
        try:
            edge = start_edge(cloud, work, keys, "edge-c")
        except processes.ProcessError as err:
            tally.add("edge", "start-up", f"the edge did not come up: {str(err)[-300:]}")
            return
        channel = Transport.load(keys["client"]).channel(edge.address)
        up = wait_serving(channel, 120)
        refused = _refusals(edge.log_path, ids[1:], 60)
        pixels = np.zeros((2, *fuzz_fleet.INPUT_SHAPE), np.uint8)
        code, details, replies = call(channel, BY_NAME["Predict"], inference_pb2.PredictRequest(input=to_proto(pixels)))
        operator = Transport.load(keys["operator"], token=True).channel(cloud.address)
        try:
            whole = operator_client.fleet(coordinator_pb2_grpc.CoordinatorServiceStub(operator))
            profiled = {p.variant_id for e in whole.edges for p in e.profiles}
        except grpc.RpcError:
            profiled = set()
        for (what, _), vid in zip(bad.items(), ids[1:]):
            problem = None if vid in refused and vid not in profiled else "the edge did not refuse it by id"
            tally.add("edge", what, problem)
        serving_good = up and code.name == "OK" and replies[0].variant_id == ids[0]
        tally.add(
            "edge",
            "the good variant",
            None if serving_good else f"edge not serving the good variant: {code.name} {details[:200]}",
        )
        alive = edge.process.poll() is None
        problems = cache_problems(work / "edge-c-cache") + ([] if alive else ["the edge process died"])
        tally.add("edge", "cache and process", "; ".join(problems) or None)
        channel.close()
        operator.close()
    finally:
        if edge is not None:
            edge.stop()
        cloud.stop()


def run(examples: int, work: Path, drive) -> dict:
    """`drive(strategy, body, examples)` runs hypothesis (as `bench.fuzz.run.drive`)."""
    work.mkdir(parents=True, exist_ok=True)
    good = fuzz_fleet.variant_bytes(0.125)
    tally = Tally()
    cases = crafted_files(good)
    for what, data, expect in cases:
        tally.add("crafted", what, check_file(data, expect, work / "load" / "case"))
    tally.add("crafted", "sha256 mismatch", _sha_mismatch(good, work / "load" / "case"))
    for kind, strategy in (("mutated", mutations(good)), ("spec", specs(good)), ("entries", entries(good))):
        drive(
            strategy,
            lambda data, kind=kind: tally.add(kind, "random", check_file(data, None, work / "load" / "case")),
            max(1, examples // 3),
        )
    stream = work / "stream"
    drive(
        scripts(len(good)),
        lambda script: tally.add("stream", "crafted", check_stream(good, script, stream)),
        max(1, examples // 3),
    )
    for vid, problem in fetcher_ids(work / "ids"):
        tally.add("ids", vid[:80], problem)
    by_name = {what: data for what, data, _ in cases}
    edge_fetches_crafted(good, {what: by_name[what] for what in AT_THE_EDGE}, work / "edge", tally)
    return {"cases": tally.cases, "kinds": tally.kinds, "crashes": tally.crashes}


def _sha_mismatch(good: bytes, folder: Path) -> str | None:
    from common import variant

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "variant.safetensors"
    path.write_bytes(good)
    try:
        variant.load(path, expected_sha256="0" * 64)
    except variant.VariantError as err:
        return None if "sha256" in str(err) else f"message names no sha256: {err}"
    return "loaded a file whose sha256 is not its id"
