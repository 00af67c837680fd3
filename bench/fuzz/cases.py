"""Hypothesis strategies for every RPC's request messages, shared by `bench.fuzz.run` and the tests.

Each strategy mixes plain random values with the ones that break servers (`bench.fuzz.values`): huge
and negative sizes, NaN and infinities, empty and very long strings, path-like ids (`../x`), wrong
dtypes, bytes that do not match their shape, and now and then a request that is valid (a known variant
id, a registered edge), so that both sides of every check are exercised. `Known` is what the fleet under test holds.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from bench.fuzz.values import SPECIAL_FLOATS, doubles, either, int32s, int64s, one_wild, page_tokens, texts
from cloud.service import paging
from protos import coordinator_pb2, inference_pb2, portfolio_pb2

FUZZ_EDGE = "fuzz-edge"  # registered by the fuzz before it starts
DTYPES = ("float32", "uint8", "float64", "int64", "FLOAT32", "", "float16", "bool")


@dataclass(frozen=True)
class Known:
    """What the fleet under test holds: valid values for the strategies to mix in."""

    variant_ids: tuple[str, ...]
    sizes: dict  # variant id -> file size in bytes
    portfolio_id: str
    edges: tuple[str, ...]  # registered edge names
    input_shape: tuple[int, int, int]
    max_batch: int


# --- PortfolioService --------------------------------------------------------------------------------
def fetch_variant(known: Known) -> st.SearchStrategy:
    offsets = st.one_of(
        int64s(), st.sampled_from(tuple(known.sizes.values())), st.integers(0, max(known.sizes.values()))
    )
    good = {"variant_id": known.variant_ids, "offset": (0, 1, *known.sizes.values())}
    return one_wild(portfolio_pb2.FetchVariantRequest, good, {"variant_id": texts(), "offset": offsets})


def list_variants(known: Known) -> st.SearchStrategy:
    return st.just(portfolio_pb2.ListVariantsRequest())


# --- InferenceService ---------------------------------------------------------------------------------
def _valid_tensor(known: Known) -> st.SearchStrategy:
    def build(n: int, dtype: str, fill: int) -> inference_pb2.Tensor:
        count = n * math.prod(known.input_shape)
        data = bytes([fill]) * count if dtype == "uint8" else b"\x00\x00\x80\x3f" * count  # 1.0f
        return inference_pb2.Tensor(shape=[n, *known.input_shape], dtype=dtype, data=data)

    return st.builds(
        build, st.integers(1, min(known.max_batch, 8)), st.sampled_from(("uint8", "float32")), st.integers(0, 255)
    )


def _sized_tensor(known: Known) -> st.SearchStrategy:
    """Bytes that match the declared shape and dtype, but a shape or dtype the variant does not take."""

    def build(shape: list[int], dtype: str, special: float) -> inference_pb2.Tensor:
        itemsize = 1 if dtype == "uint8" else 4
        count = math.prod(shape) if all(d >= 0 for d in shape) else 0
        data = bytes(count * itemsize) if dtype == "uint8" else _float_bytes(special) * count
        return inference_pb2.Tensor(shape=shape, dtype=dtype, data=data)

    shapes = st.one_of(
        st.lists(st.integers(0, 40), max_size=5).filter(lambda s: math.prod(s) <= 200_000),
        st.builds(lambda n: [n, *known.input_shape], st.sampled_from((0, known.max_batch + 1))),
    )
    return st.builds(build, shapes, st.sampled_from(("uint8", "float32")), st.sampled_from(SPECIAL_FLOATS))


def _float_bytes(value: float) -> bytes:
    return struct.pack("<f", value if math.isnan(value) or abs(value) < 3e38 else math.copysign(math.inf, value))


def _random_tensor() -> st.SearchStrategy:
    return st.builds(
        inference_pb2.Tensor,
        shape=st.lists(int64s(), max_size=6),
        dtype=st.sampled_from(DTYPES) | texts(),
        data=st.binary(max_size=4096),
    )


def predict(known: Known) -> st.SearchStrategy:
    tensors = st.one_of(_valid_tensor(known), _sized_tensor(known), _random_tensor(), st.just(inference_pb2.Tensor()))
    return st.builds(inference_pb2.PredictRequest, input=tensors) | st.just(inference_pb2.PredictRequest())


# --- CoordinatorService -------------------------------------------------------------------------------
def register(known: Known) -> st.SearchStrategy:
    good = {
        "edge": ("fuzz-edge", "fuzz-edge.2", "e_1", "x" * 128),
        "address": ("127.0.0.1:1",),
        "metrics_address": ("127.0.0.1:2", ""),
        "threads": (1, 0),
    }
    wild = {"edge": texts("x" * 129), "address": texts(), "metrics_address": texts(), "threads": int32s()}
    return one_wild(coordinator_pb2.RegisterRequest, good, wild)


def _telemetry(known: Known) -> st.SearchStrategy:
    good = {
        "timestamp": (1.7e9,),
        "active_variant": known.variant_ids,
        "request_rate": (10.0,),
        "p50_ms": (1.0,),
        "p95_ms": (2.0,),
        "p99_ms": (3.0,),
        "requests": (10,),
        "errors": (0, 1),
        "cpu_percent": (50.0,),
        "rss_bytes": (1 << 28,),
        "resident_variants": (1,),
        "portfolio_id": (known.portfolio_id,),
        "policy_version": (1,),
    }
    wild = {name: doubles() for name in ("timestamp", "request_rate", "p50_ms", "p95_ms", "p99_ms", "cpu_percent")}
    wild.update({name: int64s() for name in ("requests", "errors", "rss_bytes", "policy_version")})
    wild.update(resident_variants=int32s(), active_variant=texts(), portfolio_id=texts())
    return one_wild(coordinator_pb2.Telemetry, good, wild)


def _switch(known: Known) -> st.SearchStrategy:
    return st.builds(
        coordinator_pb2.SwitchEvent,
        timestamp=doubles(),
        from_variant=texts(*known.variant_ids),
        to_variant=texts(*known.variant_ids),
        reason=texts(),
        observed_p95_ms=doubles(),
        switch_us=doubles(),
        reason_code=texts("initial", "slo_violation"),
        request_rate=doubles(),
        window_requests=int64s(),
        predicted_p95_ms=doubles(),
        slo_ms=doubles(),
        policy_version=int64s(),
        load_ms=doubles(),
        switched=st.booleans(),
    )


def _profile(known: Known) -> st.SearchStrategy:
    return st.builds(
        coordinator_pb2.VariantProfile,
        variant_id=texts(*known.variant_ids),
        p50_ms_b1=doubles(),
        p95_ms_b1=doubles(),
        batch=int32s(),
        p50_ms_batch=doubles(),
        p95_ms_batch=doubles(),
    )


def _bodies(known: Known) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("telemetry"), _telemetry(known)),
        st.tuples(st.just("switch"), _switch(known)),
        st.tuples(st.just("profile"), _profile(known)),
        st.just(("", None)),
    )


def _report(edge: str, kind: str, body) -> coordinator_pb2.EdgeReport:
    return coordinator_pb2.EdgeReport(edge=edge, **({kind: body} if kind else {}))


def connect(known: Known) -> st.SearchStrategy:
    """One stream's worth of reports: from one registered edge (so its bodies reach their checks), or
    under random names. The running edges' names are left out: their own windows keep arriving."""
    own = st.builds(lambda bodies: [_report(FUZZ_EDGE, *b) for b in bodies], st.lists(_bodies(known), max_size=4))
    named = st.builds(lambda edge, body: _report(edge, *body), either(texts(FUZZ_EDGE), FUZZ_EDGE), _bodies(known))
    return st.one_of(own, st.lists(named, max_size=4))


def get_fleet(known: Known) -> st.SearchStrategy:
    good = {"page_size": (0, 1, 2, 1000), "page_token": ("", paging.encode("GetFleet", [], ["edge-b"]))}
    wild = {"page_size": int32s(), "page_token": page_tokens("GetFleet", [], (["edge-b"], ["edge-f"], ["~"]))}
    return one_wild(coordinator_pb2.GetFleetRequest, good, wild)


def _policy(known: Known) -> st.SearchStrategy:
    good = {
        "slo_ms": (0.0, 20.0),
        "min_accuracy": (0.0, 0.5),
        "down_windows": (0, 2),
        "up_windows": (0, 3),
        "up_headroom": (0.0, 0.5),
        "dwell_s": (0.0, 1.0),
        "window_s": (0.0, 1.0),
        "pinned_variant": ("", *known.variant_ids),
        "max_switches_per_minute": (0, 6),
        "version": (0, 7),
    }
    wild = {name: doubles() for name in ("slo_ms", "min_accuracy", "up_headroom", "dwell_s", "window_s")}
    wild.update({name: int32s() for name in ("down_windows", "up_windows", "max_switches_per_minute")})
    wild.update(pinned_variant=texts(*known.variant_ids), version=int64s())
    return one_wild(coordinator_pb2.Policy, good, wild)


def set_policy(known: Known) -> st.SearchStrategy:
    return st.builds(coordinator_pb2.SetPolicyRequest, policy=_policy(known))


def list_events(known: Known) -> st.SearchStrategy:
    good = {
        "edge": ("", *known.edges),
        "since": (0.0, 1e9),
        "limit": (0, 10),
        "page_size": (0, 1, 3),
        "page_token": ("",),
    }
    wild = {
        "edge": texts(),
        "since": doubles(),
        "limit": int32s(),
        "page_size": int32s(),
        "page_token": page_tokens("ListEvents", ["", 0.0], ([2e9, 1 << 40], [1.7e9, 5])),
    }
    return one_wild(coordinator_pb2.ListEventsRequest, good, wild)


def _thresholds() -> st.SearchStrategy:
    good = {
        "min_slo_attainment": (0.0, 0.9),
        "max_error_rate": (0.0, 0.1),
        "min_windows": (0, 2),
        "adopt_timeout_s": (0.0, 5.0),
    }
    wild = {
        "min_slo_attainment": doubles(),
        "max_error_rate": doubles(),
        "min_windows": int32s(),
        "adopt_timeout_s": doubles(),
    }
    return one_wild(coordinator_pb2.RolloutThresholds, good, wild)


def deploy(known: Known) -> st.SearchStrategy:
    good = {
        "portfolio": (known.portfolio_id,),
        "edges": ("", *known.edges),
        "canary": (0, 1),
        "thresholds": (coordinator_pb2.RolloutThresholds(),),
    }
    wild = {"portfolio": texts("/proc", "/tmp"), "edges": texts(), "canary": int32s(), "thresholds": _thresholds()}
    return one_wild(coordinator_pb2.DeployRequest, good, wild)


def rollback(known: Known) -> st.SearchStrategy:
    return st.builds(coordinator_pb2.RollbackRequest, rollout_id=either(int64s(), 0, 1), reason=either(texts(), ""))


def list_rollouts(known: Known) -> st.SearchStrategy:
    return st.builds(coordinator_pb2.ListRolloutsRequest, limit=either(int32s(), 0, 5))


def pin(known: Known) -> st.SearchStrategy:
    return st.builds(
        coordinator_pb2.PinRequest,
        edges=texts(*known.edges),
        variant_id=st.one_of(st.just(""), texts(*known.variant_ids)),
    )


def forged_tokens() -> st.SearchStrategy[list[tuple[str, str]]]:
    """`authorization` metadata that is not the operator's token: random, near misses, several at once."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    near = ("Bearer", "Bearer ", "bearer", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 5000)
    values = st.one_of(printable, st.sampled_from(near), st.builds("Bearer {}".format, printable))
    return st.lists(st.tuples(st.just("authorization"), values), min_size=1, max_size=3)


def garbage() -> st.SearchStrategy[bytes]:
    """Bytes that mostly do not parse as any message: random, truncated varints, bad wire types."""
    broken = (
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x08",
        b"\xff" * 16,
        b"\x0a\x05ab",
        b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    )
    return st.one_of(st.binary(max_size=2048), st.sampled_from(broken))
