"""Bad input against real processes: a cloud and an edge on loopback (mutual TLS, the operator token)
take hypothesis-generated requests for every RPC and raw bytes that do not parse; every answer must be
one the RPC may give, name the problem, never be OK to a bad request; the servers stay up, still serve
good requests, and write nothing outside their cache and store. Then the requests that found bugs,
each kept as a regression test, and a real edge fetching crafted variant files from a real cloud."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import cases as fuzz_cases
from bench.fuzz import run as fuzz
from bench.fuzz.files import crafted_files
from bench.fuzz.fleet import cache_problems, call, snapshot, start_fleet, variant_bytes
from bench.fuzz.loading import AT_THE_EDGE, Tally, edge_fetches_crafted
from bench.fuzz.rules import BY_NAME, RPCS
from bench.fuzz.verdicts import judge, judge_garbage
from cloud.admin import certs
from common.security import Transport
from protos import coordinator_pb2

pytestmark = pytest.mark.integration
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
S = grpc.StatusCode


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    fleet = start_fleet(work / "rpc")
    code, details, _ = call(
        fleet.channels["edge"],
        BY_NAME["Register"],
        coordinator_pb2.RegisterRequest(edge="fuzz-edge", address="127.0.0.1:1", threads=1),
    )
    assert code == S.OK, details
    allowed = [fleet.work / name for name in ("store", "logs", "certs", "edge-f-cache", "edge-b-cache")]
    before = snapshot([fleet.work], [], allowed)
    yield fleet
    try:
        assert not fleet.alive()
        assert fuzz.good_requests(fleet) == []
        assert snapshot([fleet.work], [], allowed) == before  # nothing written outside cache, store, logs
        assert [p for name in fleet.edges for p in cache_problems(fleet.work / f"{name}-cache")] == []
        assert fleet.logs() == []
    finally:
        fleet.stop()


@pytest.mark.parametrize("name", [rpc.name for rpc in RPCS])
@FUZZ
@given(data=st.data())
def test_every_rpc_answers_fuzzed_requests_with_a_status_that_names_the_problem(fleet, name, data):
    rpc = BY_NAME[name]
    request = data.draw(rpc.strategy(fleet.known), label="request")
    route = data.draw(st.sampled_from(fleet.routes(rpc)), label="token or edge")
    forged = data.draw(fuzz_cases.forged_tokens(), label="forged token") if route == "forged" else None
    code, details, replies = call(fleet.channel(rpc, route), rpc, request, metadata=forged)
    fleet.undo(rpc, code, replies)
    assert judge(rpc, request, code, details, replies, fleet.known, route) is None


@pytest.mark.parametrize("name", [rpc.name for rpc in RPCS])
@settings(FUZZ, max_examples=8)
@given(garbage=fuzz_cases.garbage())
def test_bytes_that_do_not_parse_are_refused_by_grpc_and_the_server_stays_up(fleet, name, garbage):
    rpc = BY_NAME[name]
    code, details, replies = call(
        fleet.channel(rpc, "right"), rpc, [garbage] if rpc.kind == "bidi" else garbage, raw=True
    )
    assert judge_garbage(rpc, garbage, code, details, replies, fleet.known) is None
    assert not fleet.alive()


# --- the requests that found bugs ---------------------------------------------------------------------
REGRESSIONS = [
    ("Deploy", coordinator_pb2.DeployRequest(portfolio="a" * 300), S.INVALID_ARGUMENT, "portfolio"),
    ("Pin", coordinator_pb2.PinRequest(edges=" , "), S.INVALID_ARGUMENT, "edges"),
    ("Register", coordinator_pb2.RegisterRequest(edge="fuzz-edge", threads=-1), S.INVALID_ARGUMENT, "threads"),
    ("Register", coordinator_pb2.RegisterRequest(edge="fuzz-edge", address="*" * 300), S.INVALID_ARGUMENT, "address"),
    (
        "Register",
        coordinator_pb2.RegisterRequest(edge="fuzz-edge", address="10.0.0.1:1\nforged log line"),
        S.INVALID_ARGUMENT,
        "printable",
    ),
    (
        "SetPolicy",
        coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=math.inf)),
        S.INVALID_ARGUMENT,
        "finite",
    ),
    (
        "SetPolicy",
        coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(dwell_s=math.inf)),
        S.INVALID_ARGUMENT,
        "finite",
    ),
    # a denormal SLO was accepted and broke every edge's link (its SLO bucket underflowed to 0 s)
    (
        "SetPolicy",
        coordinator_pb2.SetPolicyRequest(policy=coordinator_pb2.Policy(slo_ms=1e-320)),
        S.INVALID_ARGUMENT,
        "slo_ms",
    ),
    ("ListEvents", coordinator_pb2.ListEventsRequest(since=math.nan), S.INVALID_ARGUMENT, "since"),
    (
        "Connect",
        [coordinator_pb2.EdgeReport(telemetry=coordinator_pb2.Telemetry(timestamp=1.0))],
        S.PERMISSION_DENIED,
        "edge",
    ),
    (
        "Connect",
        [coordinator_pb2.EdgeReport(edge="fuzz-edge", telemetry=coordinator_pb2.Telemetry(timestamp=math.nan))],
        S.INVALID_ARGUMENT,
        "finite",
    ),
    (
        "Connect",
        [coordinator_pb2.EdgeReport(edge="fuzz-edge", telemetry=coordinator_pb2.Telemetry(requests=-5))],
        S.INVALID_ARGUMENT,
        "requests",
    ),
    # 5 MB profiles were stored and GetFleet failed for good past the message limit; strings from edges
    # went to the cloud's log and to operators' terminals as they came
    (
        "Connect",
        [
            coordinator_pb2.EdgeReport(
                edge="fuzz-edge", profile=coordinator_pb2.VariantProfile(variant_id="v" * (5 << 20))
            )
        ],
        S.INVALID_ARGUMENT,
        "profile.variant_id",
    ),
    (
        "Connect",
        [coordinator_pb2.EdgeReport(edge="fuzz-edge", switch=coordinator_pb2.SwitchEvent(reason="ok\nFORGED\x1b[2J"))],
        S.INVALID_ARGUMENT,
        "printable",
    ),
    ("GetFleet", coordinator_pb2.GetFleetRequest(page_token="not-a-token"), S.INVALID_ARGUMENT, "page_token"),
]


@pytest.mark.parametrize(
    "name, request_, code, word", REGRESSIONS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REGRESSIONS)]
)
def test_requests_that_once_crashed_or_were_accepted_are_refused_naming_the_field(fleet, name, request_, code, word):
    got, details, _ = call(fleet.channel(BY_NAME[name], "right"), BY_NAME[name], request_)
    assert (got, word in details) == (code, True), details


def test_a_bad_window_leaves_the_edges_reported_state_alone(fleet):
    """A window with a non-finite timestamp is refused, so it cannot freeze what the edge reports."""
    rpc, edge = BY_NAME["Connect"], "window-edge"
    own = Transport.load(certs.issue_holder(fleet.work / "certs", "edge", edge)).channel(fleet.cloud.address)
    assert call(own, BY_NAME["Register"], coordinator_pb2.RegisterRequest(edge=edge))[0] == S.OK
    bad = coordinator_pb2.Telemetry(timestamp=math.inf, portfolio_id="bogus")
    assert call(own, rpc, [coordinator_pb2.EdgeReport(edge=edge, telemetry=bad)])[0] == S.INVALID_ARGUMENT
    good = coordinator_pb2.Telemetry(timestamp=2e9, portfolio_id=fleet.known.portfolio_id, requests=1)
    assert call(own, rpc, [coordinator_pb2.EdgeReport(edge=edge, telemetry=good)])[0] == S.OK
    own.close()
    edges = call(fleet.channels["right"], BY_NAME["GetFleet"], coordinator_pb2.GetFleetRequest())[2][0].edges
    assert {e.edge: e.reported_portfolio_id for e in edges}[edge] == fleet.known.portfolio_id


def test_an_edge_refuses_crafted_variant_files_from_a_real_cloud_and_serves_the_good_one(tmp_path):
    good = variant_bytes(0.125)
    crafted = {what: data for what, data, _ in crafted_files(good)}
    tally = Tally()
    edge_fetches_crafted(good, {what: crafted[what] for what in AT_THE_EDGE}, tmp_path, tally)
    assert tally.crashes == []
    assert tally.kinds["edge"]["cases"] == len(AT_THE_EDGE) + 2
