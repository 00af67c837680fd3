"""The policy contract holds the coordinator and the edges to the same rules: both accept and refuse the
same values at every bound of every setting, both fill unset fields the same way, and every reason code
an edge can send is a member of `ReasonCode`."""

import ast
import math
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from edge_helpers import FakeCloud, portfolio_of, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.service.validation import DEFAULT_POLICY, PolicyError, validate_policy
from common import policy_contract as contract
from common.errors import PrunefleetError
from common.policy_contract import CAPPED_CODES, PolicyContractError, ReasonCode
from common.security import Transport
from edge.agent import initial_portfolio
from edge.config import AgentConfig
from edge.node import assemble
from edge.policy import Option, PolicyConfig, PolicyState, Window, decide
from protos import coordinator_pb2, portfolio_pb2

NUMERIC = [s for s in contract.SETTINGS.values() if s.kind is not str]
# a policy with every setting set, none at its default: 0 in one field then stands out
BASE = dict(
    slo_ms=123.0,
    min_accuracy=0.25,
    down_windows=4,
    up_windows=5,
    up_headroom=0.5,
    dwell_s=2.0,
    window_s=2.0,
    max_switches_per_minute=10,
    pinned_variant="",
)


def _bound_cases(s: contract.Setting) -> list[tuple[object, bool]]:
    """(value, inside the stated range) on each bound, just inside it and just outside it; for floats
    also NaN and the infinities, for every setting 0 and -1."""
    cases = [(s.kind(0), None), (s.kind(-1), None)]
    for bound, is_open, inward in ((s.low, s.low_open, 1), (s.high, s.high_open, -1)):
        if bound is None:
            continue
        if s.kind is int:
            inside, outside = bound + inward, bound - inward
        else:
            inside, outside = math.nextafter(bound, inward * math.inf), math.nextafter(bound, -inward * math.inf)
        cases += [(s.kind(bound), not is_open), (inside, True), (outside, False)]
    if s.kind is float:
        cases += [(math.nan, False), (math.inf, False), (-math.inf, False)]
    unique = {repr(v): (v, _inside(s, v) if ok is None else ok) for v, ok in cases}
    return list(unique.values())


def _inside(s: contract.Setting, value: float) -> bool:
    above = s.low is None or value > s.low or (value == s.low and not s.low_open)
    below = s.high is None or value < s.high or (value == s.high and not s.high_open)
    return above and below


CASES = [(s.name, value, inside) for s in NUMERIC for value, inside in _bound_cases(s)]


def _accepts(build) -> bool:
    try:
        build()
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("name", "value", "inside"), CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_coordinator_and_edge_accept_and_refuse_the_same_values(name, value, inside):
    policy = coordinator_pb2.Policy(**{**BASE, name: value}, version=3)
    unset_means_default = value == 0 and contract.setting(name).zero_means_default
    by_coordinator = _accepts(lambda: validate_policy(policy))
    by_edge = _accepts(lambda: PolicyConfig.from_proto(policy))
    assert by_coordinator == by_edge == (inside or unset_means_default)
    assert _accepts(lambda: PolicyConfig(**{name: value})) == inside  # the edge's own settings: 0 is 0
    if by_edge:  # and what the edge applies is the same whether the coordinator filled the gaps or not
        assert PolicyConfig.from_proto(validate_policy(policy)) == PolicyConfig.from_proto(policy)


def test_a_refusal_names_the_setting_and_is_a_project_error():
    for s in NUMERIC:
        policy = coordinator_pb2.Policy(**{**BASE, s.name: math.nan if s.kind is float else -1})
        with pytest.raises(PolicyError, match=s.name) as refused:
            validate_policy(policy)
        assert isinstance(refused.value, PolicyContractError) and isinstance(refused.value, PrunefleetError)
        with pytest.raises(PolicyContractError, match=s.name):
            PolicyConfig.from_proto(policy)


def test_wrong_types_are_refused_on_the_edge():
    for bad in (dict(down_windows=2.5), dict(slo_ms="50"), dict(up_windows=True), dict(pinned_variant=3)):
        with pytest.raises(PolicyContractError, match=next(iter(bad))):
            PolicyConfig(**bad)


def test_the_defaults_agree():
    validated = validate_policy(coordinator_pb2.Policy())
    assert PolicyConfig.from_proto(validated) == replace(PolicyConfig(), version=validated.version)
    assert PolicyConfig.from_proto(DEFAULT_POLICY) == replace(PolicyConfig(), version=DEFAULT_POLICY.version)
    assert PolicyConfig.from_proto(coordinator_pb2.Policy()) == PolicyConfig()
    assert {n: getattr(DEFAULT_POLICY, n) for n in contract.SETTINGS} == contract.defaults()


def test_zero_takes_the_default_only_where_the_contract_says_and_dwell_only_in_an_empty_policy():
    for s in NUMERIC:
        policy = coordinator_pb2.Policy(**{**BASE, s.name: 0})
        expected = s.default if s.zero_means_default else 0
        assert getattr(validate_policy(policy), s.name) == getattr(PolicyConfig.from_proto(policy), s.name) == expected
    assert validate_policy(coordinator_pb2.Policy(slo_ms=10.0)).dwell_s == 0.0  # a real dwell of 0 s
    assert PolicyConfig.from_proto(coordinator_pb2.Policy(slo_ms=10.0)).dwell_s == 0.0
    assert validate_policy(coordinator_pb2.Policy()).dwell_s == contract.setting("dwell_s").default


def test_every_default_lies_in_its_range_and_the_help_states_both():
    for s in contract.SETTINGS.values():
        assert s.problem(s.default) is None
        if s.kind is not str:
            assert f"{s.default:g}" in s.described and s.range_text in s.described


# --- reason codes -----------------------------------------------------------------------------------
FAST = Option("a" * 64, accuracy=0.80, p50_ms=3.0, p95_ms=4.0, name="fast", size_bytes=100)
MID = Option("b" * 64, accuracy=0.85, p50_ms=8.0, p95_ms=10.0, name="mid", size_bytes=200)
SLOW = Option("c" * 64, accuracy=0.90, p50_ms=20.0, p95_ms=25.0, name="slow", size_bytes=300)
OPTIONS = [FAST, MID, SLOW]
QUICK = PolicyConfig(slo_ms=30.0, down_windows=1, up_windows=1, dwell_s=0.0, max_switches_per_minute=1)


def _policy_decisions():
    """One decision for each thing the policy can do."""
    light, heavy = Window(10, 2.0), Window(10, 100.0)
    pinned = replace(QUICK, pinned_variant=SLOW.variant_id)
    yield decide(QUICK, OPTIONS, PolicyState(""), light, 1.0)  # initial
    yield decide(QUICK, OPTIONS, PolicyState("9" * 64), light, 1.0)  # active variant without a profile
    yield decide(QUICK, OPTIONS, PolicyState(MID.variant_id), None, 1.0)  # telemetry missing
    yield decide(pinned, OPTIONS, PolicyState(MID.variant_id), light, 1.0)
    yield decide(QUICK, OPTIONS, PolicyState(SLOW.variant_id, pinned=SLOW.variant_id), light, 1.0)  # unpinned
    yield decide(QUICK, OPTIONS, PolicyState(SLOW.variant_id), heavy, 1.0)  # step down
    yield decide(QUICK, OPTIONS, PolicyState(FAST.variant_id), light, 1.0)  # step up
    yield decide(QUICK, OPTIONS, PolicyState(FAST.variant_id, recent_switches=(0.5,)), light, 1.0)  # capped
    yield decide(QUICK, OPTIONS, PolicyState(SLOW.variant_id), light, 1.0)  # steady


def test_the_policy_produces_every_code_but_the_agents_and_only_members():
    decisions = list(_policy_decisions())
    assert all(type(d.reason_code) is ReasonCode for d in decisions)
    assert {d.reason_code for d in decisions} == set(ReasonCode) - {ReasonCode.PORTFOLIO}
    assert CAPPED_CODES <= set(ReasonCode) and all(code == code.value for code in ReasonCode)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.builds(Window, st.integers(0, 20), st.floats(0.0, 200.0), st.floats(0.0, 300.0))),
            st.sampled_from(["", FAST.variant_id, SLOW.variant_id, "f" * 64]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_whatever_the_policy_decides_carries_a_member(steps):
    state, now = PolicyState(""), 0.0
    for window, pin in steps:
        now += 1.0
        decision = decide(replace(QUICK, pinned_variant=pin), OPTIONS, state, window, now)
        assert type(decision.reason_code) is ReasonCode
        state = decision.state


def test_every_code_the_agent_sends_is_a_member(tmp_path):
    files, (small, big) = portfolio_of(tmp_path / "variants", [("small", 0.125, 0.80), ("big", 0.25, 0.85)])
    tiny_files, (tiny,) = portfolio_of(tmp_path / "new", [("tiny", 0.0625, 0.70)])
    cloud = FakeCloud({**files, **tiny_files}, [small, big])
    stopping = threading.Event()
    config = AgentConfig(cloud=cloud.start(), name="edge-c", cache_dir=tmp_path / "cache", profile_iters=2, batch=4)
    node = assemble(config, stopping, Transport.plaintext())
    try:
        assert initial_portfolio(node.agent, node.link)
        node.agent.start_serving()  # the initial choice: big, the SLO is generous
        threading.Thread(target=node.link.run, args=(node.agent,), daemon=True).start()
        node.agent.decide_once()
        real = node.agent._clock
        node.agent._clock = lambda: real() + 100.0  # the decision loop held up: a stale window, the fallback
        assert type(node.agent.decide_once().reason_code) is ReasonCode
        node.agent._clock = real
        listing = portfolio_pb2.ListVariantsResponse(variants=[big, tiny], portfolio_id="p2")
        cloud.directives.put(coordinator_pb2.Directive(portfolio=listing))  # small, the active one, leaves
        codes = {ReasonCode.INITIAL, ReasonCode.FALLBACK, ReasonCode.PORTFOLIO}
        wait_for(lambda: {e.reason_code for e in cloud.switches()} >= codes, what="the three events")
        assert {e.reason_code for e in cloud.switches()} <= {code.value for code in ReasonCode}
    finally:
        stopping.set()
        node.close()
        cloud.stop()


def _reason_code_literals(tree: ast.AST) -> list[int]:
    """Lines where a bare string is used as a reason code: passed to `Decision`, `_switched` or `_chosen`
    in the reason code's place or as `reason_code=`, or compared with a `reason_code`."""
    position = {"Decision": 2, "_switched": 3, "_chosen": 2}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            used = [k.value for k in node.keywords if k.arg == "reason_code"]
            used += node.args[position[name] : position[name] + 1] if name in position else []
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(getattr(side, "attr", getattr(side, "id", "")) == "reason_code" for side in sides)
            used = sides if named else []
        else:
            continue
        lines += [n.lineno for n in used if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return lines


def test_the_edge_never_uses_a_bare_string_as_a_reason_code():
    edge = Path(__file__).resolve().parents[2] / "edge"
    found = {
        f"{path.name}:{line}"
        for path in edge.rglob("*.py")
        for line in _reason_code_literals(ast.parse(path.read_text()))
    }
    assert not found
    planted = ast.parse('Decision("a", "why", "stay", s)\nif d.reason_code == "fallback": pass')
    assert _reason_code_literals(planted) == [1, 2]  # the scan finds what it looks for
