"""The *bad input* part of `prunefleet bench reliability`: fuzz every RPC of real processes, feed
malformed variant files through the edge's loading paths.

    rpcs    a real cloud and two real edges on loopback (mutual TLS, the operator token; one edge
            micro-batches) take hypothesis-generated requests for every RPC: random fields, huge and
            negative sizes, NaN and infinities, wrong dtypes, empty, very long and path-like strings;
            the operator RPCs also without, with a wrong and with a forged token; and raw bytes that
            do not parse as the request. Each answer is judged (`bench.fuzz.verdicts`), the servers'
            health is checked after every RPC, and afterwards good requests must still be served
            right, every edge must still follow the coordinator, no file may have appeared outside
            the caches, store, logs and database, the edge caches may hold only verified files, and
            no log may hold a traceback other than gRPC's refusal of unparsable bytes.
    files   malformed variant files (`bench.fuzz.files`) through `common.variant` and
            `common.tensorfile`, the fetcher with path-like ids, and a real edge fetching a portfolio
            of crafted files from a real cloud.

A crash is any answer the rules refuse; `fuzz_crashes` counts them (target 0).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.fuzz import cases as fuzz_cases
from bench.fuzz import loading as fuzz_loading
from bench.fuzz.fleet import Fleet, cache_problems, call, snapshot, start_fleet
from bench.fuzz.rules import RPCS, Rpc
from bench.fuzz.verdicts import judge, judge_garbage
from common.files import sha256_bytes
from common.wire import to_proto
from protos import coordinator_pb2, inference_pb2, portfolio_pb2

log = logging.getLogger(__name__)
QUICK = {"examples": 24, "garbage": 8, "files": 40}
FULL = {"examples": 200, "garbage": 40, "files": 300}
EDGE_SETTLE_S = 75.0  # a fuzzed policy may have set 60 s windows; the edge reports once a window


def hypothesis_settings(examples: int) -> settings:
    """Generation only (no shrinking: a crash is recorded, not raised), reproducible, no database."""
    return settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )


def drive(strategy: st.SearchStrategy, body, examples: int) -> None:
    """Call `body` with `examples` values drawn by hypothesis from `strategy`."""

    @hypothesis_settings(examples)
    @given(strategy)
    def case(value):
        body(value)

    case()


class Record:
    """Per RPC: cases, crashes and the status codes seen; the details of every crash."""

    def __init__(self):
        self.rpcs: dict[str, dict] = {}
        self.crashes: list[dict] = []

    def add(self, name: str, code, problem: str | None, request, token: str = "right", raw: bool = False) -> None:
        entry = self.rpcs.setdefault(name, {"cases": 0, "crashes": 0, "codes": Counter()})
        entry["cases"] += 1
        entry["codes"][code.name] += 1
        if problem:
            entry["crashes"] += 1
            self.crashes.append(
                {
                    "rpc": name,
                    "token": token,
                    "raw": raw,
                    "code": code.name,
                    "problem": problem,
                    "request": repr(request)[:400],
                }
            )
            log.warning("fuzz %s: %s", name, problem)

    def crash(self, name: str, problem: str) -> None:
        self.rpcs.setdefault(name, {"cases": 0, "crashes": 0, "codes": Counter()})["crashes"] += 1
        self.crashes.append({"rpc": name, "problem": problem})


def fuzz_rpc(fleet: Fleet, rpc: Rpc, record: Record, examples: int, garbage: int) -> None:
    tokens = st.sampled_from(fleet.routes(rpc))

    def one(drawn) -> None:
        request, route, forged = drawn
        metadata = forged if route == "forged" else None
        code, details, replies = call(fleet.channel(rpc, route), rpc, request, metadata=metadata)
        record.add(rpc.name, code, judge(rpc, request, code, details, replies, fleet.known, route), request, route)
        fleet.undo(rpc, code, replies)

    def raw(data: bytes) -> None:
        request = [data] if rpc.kind == "bidi" else data
        code, details, replies = call(fleet.channel(rpc, "right"), rpc, request, raw=True)
        record.add(rpc.name, code, judge_garbage(rpc, data, code, details, replies, fleet.known), data, raw=True)

    drive(st.tuples(rpc.strategy(fleet.known), tokens, fuzz_cases.forged_tokens()), one, examples)
    drive(fuzz_cases.garbage(), raw, garbage)


def good_requests(fleet: Fleet) -> list[str]:
    """After the fuzz: policy and pins back to normal, then good requests must be answered right."""
    by = {rpc.name: rpc for rpc in RPCS}
    problems = []

    def ok(name: str, request, token: str = "right"):
        code, details, replies = call(fleet.channel(by[name], token), by[name], request)
        if code.name != "OK":
            problems.append(f"good {name} answered {code.name}: {details[:200]}")
        return replies

    ok("SetPolicy", coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy()))
    ok("Pin", coordinator_pb2.PinRequest(edges="*", variant_id=""))
    listing = ok("ListVariants", portfolio_pb2.ListVariantsRequest())
    if listing and [v.variant_id for v in listing[0].variants] != list(fleet.known.variant_ids):
        problems.append("ListVariants no longer lists the portfolio")
    vid = fleet.known.variant_ids[0]
    chunks = ok("FetchVariant", portfolio_pb2.FetchVariantRequest(variant_id=vid))
    if sha256_bytes(b"".join(c.data for c in chunks)) != vid:
        problems.append("FetchVariant no longer streams the variant file")
    pixels = np.random.default_rng(0).integers(0, 256, (3, *fleet.known.input_shape), dtype=np.uint8)
    for edge in fleet.edges:
        answer = ok("Predict", inference_pb2.PredictRequest(input=to_proto(pixels)), edge)
        if answer and list(answer[0].output.shape) != [3, 10]:
            problems.append(f"Predict on {edge} answers shape {list(answer[0].output.shape)}")
    ok("Register", coordinator_pb2.RegisterRequest(edge=fuzz_cases.FUZZ_EDGE, address="127.0.0.1:2", threads=1))
    problems += _edges_follow(fleet, lambda: _whole_fleet(ok))
    return problems


def _whole_fleet(ok) -> list:
    """Every page of GetFleet through `ok` (which records a refusal) as one reply, in a list; [] when
    a page is refused."""
    whole, token = coordinator_pb2.GetFleetResponse(), ""
    while replies := ok("GetFleet", coordinator_pb2.GetFleetRequest(page_token=token)):
        whole.edges.extend(replies[0].edges)
        token = replies[0].next_page_token
        if not token:
            return [whole]
    return []


def _edges_follow(fleet: Fleet, get_fleet) -> list[str]:
    """The edges' control loops survived: each is connected and reports the policy version it is given."""
    deadline = time.monotonic() + EDGE_SETTLE_S
    while True:
        view = get_fleet()
        status = {e.edge: e for e in view[0].edges} if view else {}
        lagging = [
            name
            for name in fleet.edges
            if name not in status
            or not status[name].connected
            or status[name].policy_version != status[name].desired_policy_version
        ]
        if not lagging or time.monotonic() > deadline:
            return [f"edge {name} no longer follows the coordinator" for name in lagging]
        time.sleep(0.5)


def _handshake(fleet: Fleet, record: Record) -> None:
    """A client without a certificate is refused in the TLS handshake, and the cloud stays up."""
    rpc = RPCS[0]
    code, details, _ = call(fleet.channels["plain"], rpc, rpc.request())
    problem = None if code.name == "UNAVAILABLE" else f"plaintext client answered {code.name}: {details[:200]}"
    record.add("tls_handshake", code, problem, "plaintext ListVariants")


def fuzz_rpcs(fleet: Fleet, plan: dict, record: Record) -> None:
    work = fleet.work
    allowed = [work / name for name in ("store", "logs", "certs", "edge-f-cache", "edge-b-cache")]
    tops = [Path.cwd(), work.parent]
    before = snapshot([work], tops, allowed)
    call(
        fleet.channels["edge"],
        next(r for r in RPCS if r.name == "Register"),
        coordinator_pb2.RegisterRequest(edge=fuzz_cases.FUZZ_EDGE, address="127.0.0.1:1", threads=1),
    )
    for rpc in RPCS:
        fuzz_rpc(fleet, rpc, record, plan["examples"], plan["garbage"])
        for problem in fleet.alive():
            record.crash(rpc.name, f"after fuzzing {rpc.name}: {problem}")
        log.info("fuzzed %s: %s", rpc.name, dict(record.rpcs[rpc.name]["codes"]))
    _handshake(fleet, record)
    for problem in good_requests(fleet):
        record.crash("after", problem)
    after = snapshot([work], tops, allowed)
    for path in sorted(after - before):
        record.crash("files", f"{path.name} appeared outside the cache, store and logs")
    for problem in [p for name in fleet.edges for p in cache_problems(work / f"{name}-cache")]:
        record.crash("files", problem)
    for problem in fleet.logs():
        record.crash("logs", problem)


def run(quick: bool, data_dir: Path | None, work: Path, plan: dict | None = None) -> dict:
    """`data_dir` is unused: the variants are untrained (the fuzz needs their shapes, not their accuracy).
    Every run starts from fresh processes, database and caches in WORK/fuzz-rpc and WORK/fuzz-files, so
    its cases (derandomized) meet the same state each time."""
    plan = plan or (QUICK if quick else FULL)
    work = Path(work).resolve()
    for part in ("fuzz-rpc", "fuzz-files"):
        shutil.rmtree(work / part, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    record = Record()
    fleet = start_fleet(work / "fuzz-rpc")
    try:
        fuzz_rpcs(fleet, plan, record)
    finally:
        fleet.stop()
    files = fuzz_loading.run(plan["files"], work / "fuzz-files", drive)
    rpcs = {name: {**entry, "codes": dict(entry["codes"])} for name, entry in record.rpcs.items()}
    crashes = record.crashes + files["crashes"]
    cases = sum(e["cases"] for e in rpcs.values()) + files["cases"]
    return {
        "plan": plan,
        "rpcs": rpcs,
        "files": {k: v for k, v in files.items() if k != "crashes"},
        "crashes": crashes,
        "summary": {"fuzz_cases": cases, "fuzz_crashes": len(crashes)},
    }
