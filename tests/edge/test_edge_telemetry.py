"""The request window, the process sample, the metrics layout, and the link's outbox."""

import os
import random
import subprocess
import sys
import threading
import time

import pytest
from helpers import spec_for
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from edge import link as links
from edge.link import Link, LinkConfig, Outbox
from edge.metrics import EdgeMetrics, latency_buckets
from edge.telemetry import ProcessStats, RequestWindow
from protos import coordinator_pb2


def test_window_stats_and_reset():
    window = RequestWindow(started_at=10.0)
    for ms in range(1, 101):
        window.record(ms / 1e3, "v", True)
    window.record(0.0001, "", False)
    stats = window.close_window(12.0)
    assert (stats.requests, stats.errors, stats.rate, stats.seconds) == (101, 1, 50.5, 2.0)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p95_ms == pytest.approx(95.05)
    assert stats.p99_ms == pytest.approx(99.01)  # the failed request's latency stays out
    empty = window.close_window(13.0)
    assert (empty.requests, empty.p95_ms, empty.rate) == (0, 0.0, 0.0)


def test_window_is_thread_safe():
    window = RequestWindow(started_at=0.0)
    threads = [
        threading.Thread(target=lambda: [window.record(0.001, "v", True) for _ in range(2000)]) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert window.close_window(1.0).requests == 8000


def test_process_sample():
    stats = ProcessStats()
    sum(i * i for i in range(2_000_000))  # some CPU time for the device's share to show
    cpu, rss = stats.sample()
    assert cpu >= 0 and rss > 10 << 20
    assert stats.cores >= 1 and 0 < stats.device_busy() <= 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_device_busy_reads_only_the_cpus_the_agent_may_run_on():
    busy_cpu, idle_cpu = sorted(os.sched_getaffinity(0))[:2]
    before = os.sched_getaffinity(0)
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    try:
        os.sched_setaffinity(burner.pid, {busy_cpu})
        os.sched_setaffinity(0, {idle_cpu})  # this thread waits on the other CPU
        on_busy, on_idle = ProcessStats(cpus=[busy_cpu]), ProcessStats(cpus=[idle_cpu])
        time.sleep(1.0)
        busy, idle = on_busy.device_busy(), on_idle.device_busy()
    finally:
        os.sched_setaffinity(0, before)
        burner.kill()
        burner.wait()
    assert on_busy.cores == on_idle.cores == 1
    assert busy > 0.8 and idle < busy - 0.3, (busy, idle)
    assert ProcessStats().cores == len(before)
    with pytest.raises(ValueError, match="at least one CPU"):
        ProcessStats(cpus=[])


def test_metrics_live_on_the_injected_registry_with_a_bucket_at_the_slo():
    assert 0.042 in latency_buckets(0.042) and list(latency_buckets(0.042)) == sorted(latency_buckets(0.042))
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry, "e1", slo_s=0.042)
    metrics.switched("slo_violation", 4e-6, ["a" * 64, "b" * 64], "b" * 64)
    metrics.loaded("a" * 64, 0.5, 1234)
    text = generate_latest(registry).decode()
    assert 'prunefleet_edge_switches_total{edge="e1",reason="slo_violation"} 1.0' in text
    assert f'prunefleet_edge_active_variant{{edge="e1",variant="{"b" * 12}"}} 1.0' in text
    assert f'prunefleet_edge_active_variant{{edge="e1",variant="{"a" * 12}"}} 0.0' in text
    assert 'prunefleet_edge_resident_bytes{edge="e1"} 1234.0' in text
    assert "prunefleet_edge_switch_duration_seconds_bucket" in text
    assert "prunefleet_edge" not in generate_latest(REGISTRY).decode()  # never the global registry


def test_a_new_slo_gets_its_bucket_and_load_and_memory_metrics_are_counted():
    registry = CollectorRegistry()
    metrics = EdgeMetrics(registry, "e1", slo_s=0.042)
    metrics.request("a" * 64, "OK", 0.01)
    metrics.slo(0.023)
    metrics.request("a" * 64, "OK", 0.01)
    metrics.slo(0.042)  # an SLO that already has its bucket changes nothing
    metrics.loaded("a" * 64, 0.2, 10, "on_demand")
    metrics.memory({"a" * 64: None}, 10, evictions=2)
    metrics.budget(4096)
    text = generate_latest(registry).decode()
    for le in ("0.023", "0.042"):
        assert (
            f'prunefleet_edge_request_duration_seconds_bucket{{edge="e1",le="{le}",variant="{"a" * 12}"}} 1.0' in text
        )
    assert 'prunefleet_edge_slo_seconds{edge="e1"} 0.042' in text
    assert 'prunefleet_edge_variant_loads_total{edge="e1",source="on_demand"} 1.0' in text
    assert 'prunefleet_edge_variant_loads_total{edge="e1",source="arrival"} 0.0' in text
    assert 'prunefleet_edge_on_demand_load_seconds_count{edge="e1"} 1.0' in text
    assert 'prunefleet_edge_evictions_total{edge="e1"} 2.0' in text
    assert 'prunefleet_edge_resident_variants{edge="e1"} 1.0' in text
    assert 'prunefleet_edge_memory_budget_bytes{edge="e1"} 4096.0' in text
    assert "prunefleet_edge_process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
    assert 'python_gc_collections_total{generation="2"}' in text


def _report(kind: str, n: int) -> coordinator_pb2.EdgeReport:
    if kind == "switch":
        return coordinator_pb2.EdgeReport(edge="e1", switch=coordinator_pb2.SwitchEvent(timestamp=n))
    return coordinator_pb2.EdgeReport(edge="e1", telemetry=coordinator_pb2.Telemetry(timestamp=n))


def test_outbox_keeps_switch_events_while_disconnected_and_drops_stale_telemetry():
    outbox = Outbox(max_buffered=3, max_live=10)
    outbox.report(_report("telemetry", 0))  # nobody listening: dropped
    for n in range(5):
        outbox.event(_report("switch", n))  # bounded: the two oldest go
    assert outbox.pending_events() == 3
    alive = threading.Event()
    alive.set()
    hello = [coordinator_pb2.EdgeReport(edge="e1", profile=coordinator_pb2.VariantProfile(variant_id="a" * 64))]
    stream = outbox.stream(hello, alive)
    assert next(stream).WhichOneof("body") == "profile"
    assert [next(stream).switch.timestamp for _ in range(3)] == [2, 3, 4]
    outbox.report(_report("telemetry", 7))
    assert next(stream).telemetry.timestamp == 7
    outbox.close(alive)
    assert list(stream) == []


def test_link_config_backoff_is_bounded_and_jittered():
    config = LinkConfig(edge="e1", address="127.0.0.1:1", metrics_address="", backoff_s=0.5, max_backoff_s=4.0)
    rng = random.Random(0)
    delays = [config.delay(attempt, rng) for attempt in range(1, 40)]
    assert all(0 <= d <= 4.0 for d in delays) and len(set(delays)) > 30
    with pytest.raises(ValueError):
        LinkConfig(edge="", address="x:1", metrics_address="")


def test_interleaved_profiles_rank_a_bigger_model_slower():
    from common import models
    from edge.profiler import profile_interleaved
    from edge.variants import VariantInfo, loaded

    kwargs = {"in_channels": 1, "input_size": 28, "num_classes": 10}

    def forward(width: float):
        spec = spec_for("vgg11", dict(kwargs, width=width))
        return loaded(VariantInfo("", "", 0.0, 0, 0), spec, models.build("vgg11", spec.kwargs)).forward

    pair = {"big": (forward(0.5), (1, 28, 28)), "tiny": (forward(0.0625), (1, 28, 28))}
    profiles = profile_interleaved(pair, batch=8, iters=10, warmup=2)
    assert set(profiles) == {"big", "tiny"}
    assert all(p.batch == 8 and 0 < p.p50_ms <= p.p95_ms for p in profiles.values())
    assert profiles["tiny"].p50_ms < profiles["big"].p50_ms


def test_events_a_broken_stream_took_are_offered_again_to_the_next_one():
    outbox = Outbox(max_buffered=10, max_live=10)
    alive = threading.Event()
    alive.set()
    first = outbox.stream([], alive)
    outbox.event(_report("switch", 1))
    assert next(first).switch.timestamp == 1  # taken by a stream whose call may already be failing
    outbox.close(alive)
    assert outbox.pending_events() == 1
    again = threading.Event()
    again.set()
    assert next(outbox.stream([], again)).switch.timestamp == 1


class _SilentCall:
    """A Connect call whose link went silent: it takes what the edge sends, and nothing comes back."""

    def __init__(self, requests):
        self.cancelled, self.taken = threading.Event(), []
        threading.Thread(target=lambda: [self.taken.append(r) for r in requests], daemon=True).start()

    def __iter__(self):
        self.cancelled.wait(30)
        return iter(())

    def cancel(self):
        self.cancelled.set()


class _SilentStub:
    def Register(self, request, timeout=None):
        return coordinator_pb2.RegisterResponse()

    def Connect(self, requests, timeout=None):
        self.call = _SilentCall(requests)
        return self.call


class _Handler:
    def registered(self, reply):
        pass

    def directive(self, directive):
        raise AssertionError("nothing was sent")

    def hello(self):
        return []


def test_a_silent_stream_is_given_up_and_everything_it_took_since_last_heard_is_sent_again(monkeypatch):
    monkeypatch.setattr(links, "RESEND_S", 0.05)  # what a stream took well before its end still goes back
    outbox = Outbox(max_buffered=10, max_live=10)
    for n in range(3):
        outbox.telemetry(_report("telemetry", n))
    outbox.event(_report("switch", 9))
    stub = _SilentStub()
    link = Link(
        LinkConfig(edge="e1", address="127.0.0.1:1", metrics_address="", silence_s=0.6), stub, outbox, threading.Event()
    )
    start = time.monotonic()
    link.session(_Handler())  # returns once the watchdog cancels the silent stream
    assert stub.call.cancelled.is_set() and 0.6 <= time.monotonic() - start < 5
    assert len(stub.call.taken) == 4  # the stream took every report...
    assert (outbox.pending_telemetry(), outbox.pending_events()) == (3, 1)  # ...and every one is offered again
