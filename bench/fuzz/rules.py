"""What each RPC may answer to a fuzzed request: the table the fuzz judges answers by.

For every RPC: the status codes it may answer (beyond OK), words one of which an error's message must
hold (so it names the problem), the oracle that says whether a request is bad and the check that an
OK reply is not empty (both in `bench.fuzz.oracles`), and whether it needs the operator token. How an
answer is judged against its entry is `bench.fuzz.verdicts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from bench.fuzz import cases
from bench.fuzz import oracles as o
from bench.fuzz.cases import Known
from common import policy_contract
from protos import coordinator_pb2, inference_pb2, portfolio_pb2

S = grpc.StatusCode
TRANSPORT = {S.RESOURCE_EXHAUSTED: ("larger than max", "limit", "exceed")}  # a message over the size limit
GRPC_PARSE = {S.INTERNAL: ("deserializ",), S.INVALID_ARGUMENT: ("deserializ", "parse")}


@dataclass(frozen=True)
class Rpc:
    name: str
    method: str  # /package.Service/Method
    request: type
    reply: type
    kind: str  # "unary", "server_stream", "bidi"
    strategy: Callable[[Known], object]
    codes: dict  # allowed error code -> words one of which the message must hold
    bad: Callable  # (request, known) -> reason it is bad, "" when good, None when undecided
    empty: Callable  # (request, replies, known) -> what is wrong with an OK reply, None when fine
    operator: bool = False  # needs the operator token


def _rpc(service: str, name: str, request, reply, kind, strategy, codes, bad, empty, operator=False) -> Rpc:
    return Rpc(name, f"/prunefleet.v1.{service}/{name}", request, reply, kind, strategy, codes, bad, empty, operator)


C, P, I = "CoordinatorService", "PortfolioService", "InferenceService"  # noqa: E741 - the three services, by initial
RPCS = (
    _rpc(
        P,
        "ListVariants",
        portfolio_pb2.ListVariantsRequest,
        portfolio_pb2.ListVariantsResponse,
        "unary",
        cases.list_variants,
        {},
        o.always_good,
        o.nonempty("variants"),
    ),
    _rpc(
        P,
        "FetchVariant",
        portfolio_pb2.FetchVariantRequest,
        portfolio_pb2.VariantChunk,
        "server_stream",
        cases.fetch_variant,
        {S.INVALID_ARGUMENT: ("variant_id",), S.NOT_FOUND: ("variant",), S.OUT_OF_RANGE: ("offset",)},
        o.fetch_bad,
        o.fetch_empty,
    ),
    _rpc(
        I,
        "Predict",
        inference_pb2.PredictRequest,
        inference_pb2.PredictResponse,
        "unary",
        cases.predict,
        {S.INVALID_ARGUMENT: ("dtype", "shape", "bytes", "nan"), S.RESOURCE_EXHAUSTED: ("limit", "bytes")},
        o.predict_bad,
        o.predict_empty,
    ),
    _rpc(
        C,
        "Register",
        coordinator_pb2.RegisterRequest,
        coordinator_pb2.RegisterResponse,
        "unary",
        cases.register,
        {S.INVALID_ARGUMENT: ("edge", "threads", "address"), S.PERMISSION_DENIED: ("edge",)},
        o.register_bad,
        o.register_empty,
    ),
    _rpc(
        C,
        "Connect",
        coordinator_pb2.EdgeReport,
        coordinator_pb2.Directive,
        "bidi",
        cases.connect,
        {S.PERMISSION_DENIED: ("edge",), S.INVALID_ARGUMENT: ("telemetry", "switch", "profile", "request")},
        o.connect_bad,
        o.connect_empty,
    ),
    _rpc(
        C,
        "GetFleet",
        coordinator_pb2.GetFleetRequest,
        coordinator_pb2.GetFleetResponse,
        "unary",
        cases.get_fleet,
        {S.INVALID_ARGUMENT: ("page_size", "page_token")},
        o.fleet_bad,
        o.fleet_empty,
        operator=True,
    ),
    _rpc(
        C,
        "SetPolicy",
        coordinator_pb2.SetPolicyRequest,
        coordinator_pb2.SetPolicyResponse,
        "unary",
        cases.set_policy,
        {S.INVALID_ARGUMENT: tuple(policy_contract.SETTINGS)},  # the contract's messages name the setting
        o.policy_bad,
        o.policy_empty,
        operator=True,
    ),
    _rpc(
        C,
        "ListEvents",
        coordinator_pb2.ListEventsRequest,
        coordinator_pb2.ListEventsResponse,
        "unary",
        cases.list_events,
        {S.INVALID_ARGUMENT: ("limit", "since", "page_size", "page_token")},
        o.events_bad,
        o.nothing_to_check,
        operator=True,
    ),
    _rpc(
        C,
        "Deploy",
        coordinator_pb2.DeployRequest,
        coordinator_pb2.DeployResponse,
        "unary",
        cases.deploy,
        {
            S.INVALID_ARGUMENT: ("portfolio", "selector", "canary", "min_", "max_error_rate", "adopt_timeout"),
            S.FAILED_PRECONDITION: ("rollout",),
        },
        o.deploy_bad,
        o.rollout_empty,
        operator=True,
    ),
    _rpc(
        C,
        "Rollback",
        coordinator_pb2.RollbackRequest,
        coordinator_pb2.RollbackResponse,
        "unary",
        cases.rollback,
        {
            S.INVALID_ARGUMENT: ("rollout_id", "reason"),
            S.NOT_FOUND: ("rollout",),
            S.FAILED_PRECONDITION: ("rollout", "rolled back"),
        },
        o.rollback_bad,
        o.rollout_empty,
        operator=True,
    ),
    _rpc(
        C,
        "ListRollouts",
        coordinator_pb2.ListRolloutsRequest,
        coordinator_pb2.ListRolloutsResponse,
        "unary",
        cases.list_rollouts,
        {S.INVALID_ARGUMENT: ("limit",)},
        o.rollouts_bad,
        o.nothing_to_check,
        operator=True,
    ),
    _rpc(
        C,
        "Pin",
        coordinator_pb2.PinRequest,
        coordinator_pb2.PinResponse,
        "unary",
        cases.pin,
        {S.INVALID_ARGUMENT: ("variant_id", "edges"), S.NOT_FOUND: ("selector", "edge")},
        o.pin_bad,
        o.pin_empty,
        operator=True,
    ),
)
BY_NAME = {rpc.name: rpc for rpc in RPCS}
