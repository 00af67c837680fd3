"""The wired agent against an in-process fake cloud: bring-up, the Connect contract, directives,
decisions while the cloud is away, and flushing buffered switch events on reconnect."""

import contextlib
import dataclasses
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from edge_helpers import FakeCloud, portfolio_of, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.files import portfolio_id, sha256_bytes
from common.security import Transport
from common.wire import to_proto
from edge.agent import initial_portfolio
from edge.cache import LOCK_NAME
from edge.config import AgentConfig
from edge.listing_guard import STATE_NAME, load_accepted
from edge.node import assemble
from protos import coordinator_pb2, inference_pb2, inference_pb2_grpc, portfolio_pb2


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory):
    return portfolio_of(tmp_path_factory.mktemp("variants"), [("small", 0.125, 0.80), ("big", 0.25, 0.85)])


@pytest.fixture
def wired(portfolio, tmp_path):
    files, infos = portfolio
    lying = b"these bytes do not hash to their id"
    liar = portfolio_pb2.VariantInfo(variant_id=sha256_bytes(b"the real file"), name="liar", accuracy=0.99)
    cloud = FakeCloud({**files, liar.variant_id: lying}, infos + [liar])
    address = cloud.start()
    stopping = threading.Event()
    config = AgentConfig(
        cloud=address,
        name="edge-t",
        cache_dir=tmp_path / "cache",
        profile_iters=3,
        batch=4,
        backoff_s=0.05,
        max_backoff_s=0.2,
        fetch_attempts=2,
    )
    node = assemble(config, stopping, Transport.plaintext())
    yield cloud, node, infos, liar
    stopping.set()
    node.close()
    cloud.stop()


def _start(node):
    assert initial_portfolio(node.agent, node.link)
    node.agent.start_serving()
    thread = threading.Thread(target=node.link.run, args=(node.agent,), daemon=True)
    thread.start()
    return thread


def test_bring_up_loads_verified_variants_and_reports_over_connect(wired):
    cloud, node, infos, liar = wired
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(node.address))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    _start(node)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    held = set(node.agent.runtime.variants())
    assert held == {v.variant_id for v in infos} and liar.variant_id not in held  # a mismatch is never loaded
    request = cloud.registrations[0]
    assert (request.edge, request.address, request.metrics_address) == ("edge-t", node.address, node.metrics_address)
    wait_for(lambda: len(cloud.switches()) == 1, what="the initial switch event")
    stream = cloud.streams[0]
    assert stream[0].edge == "edge-t" and stream[0].WhichOneof("body") == "profile"
    assert all(report.edge == "edge-t" for report in stream)
    assert {r.profile.variant_id for r in stream if r.WhichOneof("body") == "profile"} == held
    initial = cloud.switches()[0]
    assert initial.reason_code == "initial" and initial.to_variant == infos[1].variant_id  # big: SLO is generous
    node.agent.decide_once()
    wait_for(lambda: any(r.WhichOneof("body") == "telemetry" for r in stream), what="a telemetry report")
    telemetry = next(r.telemetry for r in stream if r.WhichOneof("body") == "telemetry")
    assert telemetry.active_variant == infos[1].variant_id and telemetry.resident_variants == 2
    assert telemetry.rss_bytes > 0


def test_the_policy_window_carries_the_cpu_each_request_cost(wired):
    _, node, _, _ = wired
    _start(node)
    node.agent._policy_window(node.agent._clock())  # a fresh window and CPU sample
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(node.address))
    request = inference_pb2.PredictRequest(input=to_proto(np.zeros((4, 1, 28, 28), np.float32)))
    for _ in range(100):  # enough CPU time to register at the clock-tick resolution of process times
        stub.Predict(request, timeout=10)
    window = node.agent._policy_window(node.agent._clock())
    assert window.requests == 100 and window.rate > 0
    assert 0 < window.cpu_ms_per_request < 10_000
    assert 0 < window.slot_ms_per_request < 10_000  # each held a slot for its forward pass


def test_the_policy_window_rate_counts_requests_still_waiting(wired):
    """Under overload the answers come at the active variant's capacity whatever the load: the rate the
    policy sees is what came, answered or still waiting, each request counted in the window it came in."""
    _, node, _, _ = wired
    _start(node)
    agent = node.agent
    agent._policy_window(agent._clock())  # a fresh window
    with _waiting_for_the_slot(node, 6):
        came = agent._policy_window(agent._clock())
    assert came.requests == 0 and came.in_flight == 6 and came.rate > 0
    answered = agent._policy_window(agent._clock())
    assert answered.requests == 6 and answered.in_flight == 0 and answered.rate == 0.0  # they came before


def test_a_window_closed_early_takes_the_rate_of_its_recent_stretch(wired):
    """A queue alarm closes a window soon after the load rose: its average rate mixes the new load with
    the calm before it. The policy sees the rate of the last stretch instead, so it steps down far
    enough at once; a window that ran its whole length keeps its average."""
    _, node, _, _ = wired
    _start(node)
    agent = node.agent
    t0 = agent._clock()
    agent._policy_window(t0)  # a fresh window
    agent.windows.note_arrivals(t0 + 0.5)
    agent.windows.note_arrivals(t0 + 0.8)  # nothing came in the first 0.8 s
    with _waiting_for_the_slot(node, 6):  # then 6 at once
        early = agent._policy_window(t0 + 1.0, early=True)
    assert early.in_flight == 6 and early.rate == pytest.approx(6 / 0.2)  # not 6 / 1.0
    agent.windows.note_arrivals(t0 + 10.0)
    with _waiting_for_the_slot(node, 6):
        agent.windows.note_arrivals(t0 + 10.9)
        full = agent._policy_window(t0 + 11.0)  # closed at its end: its own average
    assert full.rate == pytest.approx(6 / 10.0)
    assert agent.windows.recent_rate(t0 + 11.02, since=t0 + 11.0) == 0.0  # too short a stretch to measure


def test_a_policy_directive_pins_and_the_switch_is_reported(wired):
    cloud, node, infos, _ = wired
    _start(node)
    small = infos[0].variant_id
    cloud.directives.put(
        coordinator_pb2.Directive(policy=coordinator_pb2.Policy(slo_ms=1000.0, pinned_variant=small, version=2))
    )
    wait_for(lambda: node.agent.policy.version == 2, what="the new policy")
    decision = node.agent.decide_once()
    assert decision.reason_code == "pinned" and node.agent.runtime.active.variant_id == small
    event = wait_for(lambda: [e for e in cloud.switches() if e.reason_code == "pinned"], what="the pin event")[0]
    assert event.from_variant == infos[1].variant_id and event.to_variant == small and event.switch_us > 0


def test_decisions_go_on_without_the_cloud_and_events_flush_on_reconnect(wired):
    cloud, node, infos, _ = wired
    _start(node)
    wait_for(lambda: cloud.switches(), what="the initial switch event")
    cloud.stop()
    small = infos[0].variant_id
    node.agent.set_policy(coordinator_pb2.Policy(slo_ms=1000.0, pinned_variant=small, version=3))
    assert node.agent.decide_once().reason_code == "pinned"  # decided and switched locally, cloud down
    assert node.agent.runtime.active.variant_id == small
    registrations = len(cloud.registrations)
    cloud.start(cloud.port)
    event = wait_for(
        lambda: [e for e in cloud.switches() if e.reason_code == "pinned"],
        timeout_s=15,
        what="the buffered switch event",
    )[0]
    assert event.to_variant == small
    assert len(cloud.registrations) > registrations  # re-registered on reconnect
    windows = wait_for(
        lambda: [r.telemetry for r in cloud.reports if r.WhichOneof("body") == "telemetry"],
        timeout_s=15,
        what="the telemetry window buffered while the cloud was away",
    )
    assert windows[0].policy_version == 3  # the window closed while the cloud was away, under the local policy
    assert windows[0].portfolio_id == portfolio_id(v.variant_id for v in infos)
    assert cloud.streams[-1][0].edge == "edge-t"


def test_a_portfolio_directive_loads_new_variants_switches_in_and_drops_the_old(wired, tmp_path):
    cloud, node, infos, _ = wired
    _start(node)
    files, (tiny,) = portfolio_of(tmp_path / "new", [("tiny", 0.0625, 0.70)])
    cloud.files.update(files)
    small, big = infos
    assert node.agent.runtime.active.variant_id == big.variant_id
    cloud.directives.put(
        coordinator_pb2.Directive(
            portfolio=portfolio_pb2.ListVariantsResponse(variants=[small, tiny], portfolio_id="p2")
        )
    )
    event = wait_for(lambda: [e for e in cloud.switches() if e.reason_code == "portfolio"], what="the switch in")[0]
    assert (event.from_variant, event.to_variant) == (big.variant_id, small.variant_id)  # the best that stayed
    wait_for(lambda: set(node.agent.runtime.variants()) == {small.variant_id, tiny.variant_id}, what="the eviction")
    assert {o.variant_id for o in node.agent.options()} == {small.variant_id, tiny.variant_id}
    profiles = wait_for(
        lambda: [
            r for r in cloud.reports if r.WhichOneof("body") == "profile" and r.profile.variant_id == tiny.variant_id
        ],
        what="the new variant's profile",
    )
    assert profiles[0].edge == "edge-t"


def test_an_edge_with_the_cloud_key_loads_only_variants_signed_by_it(portfolio, tmp_path):
    from cloud.admin import certs
    from common.security import Signer

    keys, other = certs.init(tmp_path / "certs"), certs.init(tmp_path / "other")
    files, (small, big) = portfolio
    signed, unsigned, forged = (portfolio_pb2.VariantInfo(), portfolio_pb2.VariantInfo(), portfolio_pb2.VariantInfo())
    signed.CopyFrom(small)
    signed.signature = Signer.load(keys["cloud"] / "signing.key").sign(small.variant_id)
    unsigned.CopyFrom(big)
    forged.CopyFrom(big)
    forged.signature = Signer.load(other["cloud"] / "signing.key").sign(big.variant_id)
    cloud = FakeCloud(files, [signed, unsigned, forged], signer=Signer.load(keys["cloud"] / "signing.key"))
    address = cloud.start()
    stopping = threading.Event()
    config = AgentConfig(
        cloud=address,
        name="edge-s",
        cache_dir=tmp_path / "cache",
        profile_iters=2,
        batch=4,
        fetch_attempts=1,
        verify_key=keys["edge"] / "signing.pub",
    )
    node = assemble(config, stopping, Transport.plaintext())
    try:
        assert initial_portfolio(node.agent, node.link)
        assert set(node.agent.runtime.variants()) == {small.variant_id}
        held = {p.name for p in (tmp_path / "cache").iterdir() if p.name not in (LOCK_NAME, STATE_NAME)}
        assert held == {f"{small.variant_id}.safetensors"}  # the others never fetched
        assert node.agent.listings.accepted.version == 1
        _refuses_what_the_cloud_did_not_sign(cloud, node, signed)
    finally:
        stopping.set()
        node.close()
        cloud.stop()


def _refuses_what_the_cloud_did_not_sign(cloud, node, signed):
    """Directives with a listing changed, older, unsigned or expired are refused, each counted by its
    reason on the metrics endpoint; a newer one (an operator's rollback) is taken and stored."""
    raised = portfolio_pb2.VariantInfo()
    raised.CopyFrom(signed)
    raised.accuracy = 0.99
    tampered, unsigned = cloud.listing(), cloud.listing()
    tampered.variants[0].accuracy = 0.99
    unsigned.signature = b""
    for listing in (tampered, cloud.listing(version=0), unsigned, cloud.listing([raised], version=2, expires_at=1)):
        node.agent.directive(coordinator_pb2.Directive(portfolio=listing))
    assert node.agent.listings.accepted.version == 1
    with urllib.request.urlopen(f"http://{node.metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for reason in ("bad_signature", "older_version", "unsigned", "expired"):
        assert f'prunefleet_edge_listings_refused_total{{edge="edge-s",reason="{reason}"}} 1.0' in text
    node.agent.directive(coordinator_pb2.Directive(portfolio=cloud.listing(version=2)))
    assert node.agent.listings.accepted.version == 2 == load_accepted(node.agent.config.cache_dir / STATE_NAME).version


def test_a_stale_telemetry_window_falls_back_to_the_smallest_and_reports_why(wired):
    cloud, node, infos, _ = wired
    _start(node)
    small, big = infos
    assert node.agent.runtime.active.variant_id == big.variant_id
    node.agent.decide_once()
    real = node.agent._clock
    node.agent._clock = lambda: real() + 100.0  # the decision loop was held up for 100 windows
    decision = node.agent.decide_once()
    assert decision.reason_code == "fallback" and node.agent.runtime.active.variant_id == small.variant_id
    event = wait_for(lambda: [e for e in cloud.switches() if e.reason_code == "fallback"], what="the event")[0]
    assert event.telemetry_missing and event.switched and "telemetry missing" in event.reason
    assert event.policy_version == 1 and event.slo_ms == 1000.0


def test_requests_refused_before_serving_are_reported_under_no_portfolio(wired):
    """A canary restarted mid-rollout refuses requests until its portfolio is loaded; those errors are
    no evidence against the portfolio, so the window holding them names none (a rollout judges only
    windows on its portfolio) and the windows after it carry no errors."""
    cloud, node, infos, _ = wired
    assert initial_portfolio(node.agent, node.link)
    predict = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(node.address)).Predict
    request = inference_pb2.PredictRequest(input=to_proto(np.zeros((1, 1, 28, 28), np.uint8)))
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            predict(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    node.agent.start_serving()
    threading.Thread(target=node.link.run, args=(node.agent,), daemon=True).start()
    assert predict(request, timeout=5).variant_id == node.agent.runtime.active.variant_id
    node.agent.decide_once()
    windows = wait_for(
        lambda: (
            (w := [r.telemetry for r in cloud.reports if r.WhichOneof("body") == "telemetry"]) and len(w) >= 2 and w
        ),
        what="the start-up window and the next",
    )
    held = portfolio_id(v.variant_id for v in infos)
    assert (windows[0].portfolio_id, windows[0].requests, windows[0].errors) == ("", 3, 3)
    assert windows[1].portfolio_id == held and (windows[1].requests, windows[1].errors) == (1, 0)


@contextlib.contextmanager
def _waiting_for_the_slot(node, count: int):
    """`count` Predicts over gRPC waiting while the device's slot is held; they are answered when the
    block exits."""
    predict = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(node.address)).Predict
    request = inference_pb2.PredictRequest(input=to_proto(np.zeros((4, 1, 28, 28), np.uint8)))
    slot = node.agent.runtime._slots
    slot.acquire()  # the device is busy: what comes now waits
    waiting = [threading.Thread(target=predict, args=(request,), kwargs={"timeout": 30}) for _ in range(count)]
    try:
        for thread in waiting:
            thread.start()
        wait_for(lambda: node.agent.runtime.in_flight == count, what=f"{count} inferences waiting")
        yield
    finally:
        slot.release()
        for thread in waiting:
            thread.join(30)


def test_a_queue_building_up_within_a_window_closes_it_early(wired):
    """Inferences waiting for the device's slot that the active variant would need half the SLO to
    serve raise the queue alarm, and the decision loop closes the window then, not at its end."""
    _, node, _, _ = wired
    _start(node)
    agent = node.agent
    agent.policy = dataclasses.replace(agent.policy, window_s=60.0, slo_ms=1000.0)
    with _waiting_for_the_slot(node, 6):
        assert not agent.queue_alarm(window_age_s=5.0)  # 6 queued take far less than half of a 1 s SLO
        agent.policy = dataclasses.replace(agent.policy, slo_ms=0.01)
        assert agent.queue_alarm(window_age_s=5.0) and not agent.queue_alarm(window_age_s=0.01)  # too young
        loop = threading.Thread(target=agent.decision_loop, daemon=True)
        loop.start()
        wait_for(lambda: agent._decided_at is not None, timeout_s=5, what="a window closed early")  # not in 60 s
    assert agent.runtime.in_flight == 0 and not agent.queue_alarm(window_age_s=5.0)
