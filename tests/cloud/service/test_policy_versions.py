"""Policy versions under concurrent operator calls, through a real cloud server on loopback: every
SetPolicy and Pin gets its own version, the versions run without gap or reuse, the history holds each
call's policy, and a connected edge ends on the newest one."""

import threading

import grpc
import pytest
from helpers import variant_store
from prometheus_client import CollectorRegistry

from cloud.service import server
from common.security import Transport
from protos import coordinator_pb2, coordinator_pb2_grpc

THREADS, CALLS = 8, 25
EDGES = [f"edge-{i}" for i in range(4)]


@pytest.fixture()
def cloud(tmp_path):
    store = variant_store(tmp_path / "store")
    running = server.start(
        server.CloudConfig(store=store.root, transport=Transport.plaintext(), db=tmp_path / "fleet.sqlite"),
        CollectorRegistry(),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    for name in EDGES:
        stub.Register(coordinator_pb2.RegisterRequest(edge=name, address="127.0.0.1:1", threads=1), timeout=5)
    yield [v.variant_id for v in store.manifest().variants], stub, running
    channel.close()
    running.stop(0)


def _call(stub, variants: list[str], thread: int, i: int) -> tuple[str, object, coordinator_pb2.Policy]:
    """One operator call, different in every thread and round: (kind, what it set, the policy it got)."""
    if (thread + i) % 3 == 0:
        pin = (EDGES[(thread + i) % len(EDGES)], (variants + [""])[i % 3])
        reply = stub.Pin(coordinator_pb2.PinRequest(edges=pin[0], variant_id=pin[1]), timeout=30)
        assert list(reply.edges) == [pin[0]]
        return "pin", pin, reply.policy
    values = (1.0 + thread * 100 + i, float(thread))
    policy = coordinator_pb2.Policy(slo_ms=values[0], dwell_s=values[1])
    return "set", values, stub.SetPolicy(coordinator_pb2.SetPolicyRequest(policy=policy), timeout=30).policy


def _hammer(stub, variants: list[str]) -> list[tuple[str, object, coordinator_pb2.Policy]]:
    """THREADS threads, released together, each making CALLS calls; every call's outcome."""
    start, results, failures = threading.Barrier(THREADS), [], []

    def work(thread: int) -> None:
        start.wait()
        try:
            for i in range(CALLS):
                results.append(_call(stub, variants, thread, i))
        except Exception as err:  # a failed call fails the test below, with its error
            failures.append(err)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures, failures
    return results


def _without_version(policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
    copy = coordinator_pb2.Policy()
    copy.CopyFrom(policy)
    copy.version = 0
    return copy


def _open_stream(stub, edge: str, done: threading.Event):
    """A bound edge stream that stays open until `done`; its first three directives already read."""

    def reports():
        yield coordinator_pb2.EdgeReport(edge=edge, telemetry=coordinator_pb2.Telemetry(timestamp=1.0))
        done.wait(60)

    stream = stub.Connect(reports(), timeout=60)
    assert [next(stream).WhichOneof("body") for _ in range(3)] == ["policy", "portfolio", "policy"]
    return stream


def test_concurrent_set_policy_and_pin_get_distinct_contiguous_versions(cloud):
    variants, stub, running = cloud
    first = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5).policy.version
    done, received = threading.Event(), []
    stream = _open_stream(stub, "edge-0", done)
    reader = threading.Thread(target=lambda: received.extend(stream))
    reader.start()
    results = _hammer(stub, variants)
    done.set()
    reader.join(timeout=60)

    versions = sorted(policy.version for _, _, policy in results)
    assert versions == list(range(first + 1, first + 1 + THREADS * CALLS))  # none reused, no gap
    history = {p.version: p for p in running.db.policies()}
    assert sorted(history) == [first, *versions]  # one row per version, the seed included
    for kind, value, policy in results:
        assert history[policy.version] == policy  # the row is what the call was told
        if kind == "set":
            assert (policy.slo_ms, policy.dwell_s) == value
        else:  # a pin changes nothing in the policy but its version
            assert _without_version(policy) == _without_version(history[policy.version - 1])

    fleet = stub.GetFleet(coordinator_pb2.GetFleetRequest(), timeout=5)
    assert fleet.policy == history[versions[-1]]
    by_version = sorted(results, key=lambda result: result[2].version)
    last_pin = dict(value for kind, value, _ in by_version if kind == "pin")  # the newest pin of each edge
    assert {e.edge: e.pinned_variant for e in fleet.edges} == {e: last_pin.get(e, "") for e in EDGES}

    policies = [d.policy for d in received if d.WhichOneof("body") == "policy"]
    assert policies[-1].version == versions[-1]  # the edge ends on the newest policy, with its own pin
    assert policies[-1].pinned_variant == last_pin.get("edge-0", "")
