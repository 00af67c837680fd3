"""CoordinatorService: registration, the edge stream (reports up, policy and portfolio down), fleet view.

The coordinator never decides for an edge; it stores what edges report and hands them the policy.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc

from cloud.fleet import FleetDB
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2

log = logging.getLogger(__name__)
MAX_EDGE_NAME = 128
MAX_EVENTS = 10_000
DEFAULT_POLICY = coordinator_pb2.Policy(slo_ms=50.0, min_accuracy=0.0, down_windows=2, up_windows=3,
                                        up_headroom=0.7, dwell_s=5.0, window_s=1.0, version=1,
                                        max_switches_per_minute=6)
ZERO_MEANS_DEFAULT = ("slo_ms", "down_windows", "up_windows", "up_headroom", "window_s", "max_switches_per_minute")
_CLOSE = object()


class PolicyError(ValueError):
    """A policy that cannot be applied; the message names the field."""


def validate_policy(policy: coordinator_pb2.Policy) -> coordinator_pb2.Policy:
    """Fill unset fields from the defaults and check the ranges."""
    merged = coordinator_pb2.Policy()
    merged.CopyFrom(policy)
    for name in ZERO_MEANS_DEFAULT:
        if getattr(merged, name) == 0:
            setattr(merged, name, getattr(DEFAULT_POLICY, name))
    checks = [(merged.slo_ms > 0, "slo_ms must be positive"),
              (0 <= merged.min_accuracy <= 1, "min_accuracy must be in [0, 1]"),
              (merged.down_windows >= 1 and merged.up_windows >= 1, "down_windows and up_windows must be >= 1"),
              (0 < merged.up_headroom <= 1, "up_headroom must be in (0, 1]"),
              (merged.dwell_s >= 0, "dwell_s must be >= 0"),
              (0.1 <= merged.window_s <= 60, "window_s must be in [0.1, 60]"),
              (1 <= merged.max_switches_per_minute <= 600, "max_switches_per_minute must be in [1, 600]")]
    for ok, message in checks:
        if not ok:
            raise PolicyError(message)
    return merged


def _valid_edge_name(name: str) -> bool:
    return 0 < len(name) <= MAX_EDGE_NAME and all(c.isalnum() or c in "-_." for c in name)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, db: FleetDB, portfolio: Callable[[], portfolio_pb2.ListVariantsResponse],
                 clock: Callable[[], float]):
        self._db = db
        self._portfolio = portfolio
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[str, queue.Queue]] = {}
        if db.policy() is None:
            db.save_policy(DEFAULT_POLICY)

    def _connected(self) -> set[str]:
        with self._lock:
            return {edge for edge, _ in self._streams.values() if edge}

    def Register(self, request, context):
        if not _valid_edge_name(request.edge):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"edge name must be 1-{MAX_EDGE_NAME} characters of letters, digits, '-', '_' or '.'")
        self._db.register(request)
        log.info("edge %s registered at %s", request.edge, request.address)
        portfolio = self._portfolio()
        return coordinator_pb2.RegisterResponse(policy=self._db.policy(), variants=portfolio.variants,
                                                portfolio_id=portfolio.portfolio_id)

    def _consume(self, reports, stream_id: int, outbox: queue.Queue) -> None:
        try:
            for report in reports:
                if not self._accept(report, stream_id):
                    outbox.put(("error", f"unknown or unregistered edge {report.edge[:MAX_EDGE_NAME]!r}"))
                    return
        except grpc.RpcError:
            pass
        finally:
            outbox.put(_CLOSE)

    def _accept(self, report: coordinator_pb2.EdgeReport, stream_id: int) -> bool:
        edge = report.edge
        with self._lock:
            bound, outbox = self._streams[stream_id]
        if bound != edge:
            if bound or not self._db.is_registered(edge):
                return False
            with self._lock:
                self._streams[stream_id] = (edge, outbox)
        kind = report.WhichOneof("body")
        if kind == "telemetry":
            self._db.record_telemetry(edge, report.telemetry)
        elif kind == "switch":
            self._db.record_event(edge, report.switch)
            log.info("edge %s switched %s -> %s: %s", edge, report.switch.from_variant[:12],
                     report.switch.to_variant[:12], report.switch.reason)
        elif kind == "profile":
            self._db.record_profile(edge, report.profile)
        else:
            self._db.touch(edge)
        return True

    def Connect(self, request_iterator, context):
        outbox: queue.Queue = queue.Queue()
        stream_id = id(outbox)
        with self._lock:
            self._streams[stream_id] = ("", outbox)
        outbox.put(coordinator_pb2.Directive(policy=self._db.policy()))
        threading.Thread(target=self._consume, args=(request_iterator, stream_id, outbox), daemon=True).start()
        try:
            while context.is_active():
                try:
                    item = outbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is _CLOSE:
                    return
                if isinstance(item, tuple):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, item[1])
                yield item
        finally:
            with self._lock:
                self._streams.pop(stream_id, None)

    def _broadcast(self, directive: coordinator_pb2.Directive) -> None:
        with self._lock:
            for _, outbox in self._streams.values():
                outbox.put(directive)

    def GetFleet(self, request, context):
        connected = self._connected()
        edges = self._db.edges()
        for edge in edges:
            edge.connected = edge.edge in connected
        return coordinator_pb2.GetFleetResponse(edges=edges, policy=self._db.policy(),
                                                portfolio_id=self._portfolio().portfolio_id)

    def SetPolicy(self, request, context):
        try:
            policy = validate_policy(request.policy)
        except PolicyError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        known = {v.variant_id for v in self._portfolio().variants}
        if policy.pinned_variant and policy.pinned_variant not in known:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"pinned_variant {policy.pinned_variant[:80]!r} is not a variant of the current portfolio")
        policy.version = self._db.policy().version + 1
        self._db.save_policy(policy)
        self._broadcast(coordinator_pb2.Directive(policy=policy))
        log.info("policy v%d: slo %.1f ms", policy.version, policy.slo_ms)
        return coordinator_pb2.SetPolicyResponse(policy=policy)

    def ListEvents(self, request, context):
        if request.limit < 0 or request.limit > MAX_EVENTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be in [0, {MAX_EVENTS}]")
        events = self._db.events(request.edge, request.since, request.limit or 1000)
        return coordinator_pb2.ListEventsResponse(events=events)
