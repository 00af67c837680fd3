"""CoordinatorService: registration, the edge stream (reports up, policy and portfolio down, and
an empty heartbeat directive whenever the stream has been idle for `heartbeat_s`), fleet view, rollouts.

The coordinator never decides for an edge's variant; it stores what edges report, hands them the
policy and the portfolio it wants each to hold (desired state), and compares that with what each
edge says it holds (reported state).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc

from cloud.catalog import Catalog
from cloud.fleet import FleetDB
from cloud.rollout import RolloutConflict, RolloutError, Rollouts, select
from cloud.store import StoreError
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2

log = logging.getLogger(__name__)
MAX_EDGE_NAME = 128
MAX_EVENTS = 10_000
MAX_ROLLOUTS = 1000
OPERATOR_METHODS = tuple(f"/prunefleet.v1.CoordinatorService/{m}"
                         for m in ("GetFleet", "SetPolicy", "ListEvents", "Deploy", "Rollback", "ListRollouts", "Pin"))
DEFAULT_POLICY = coordinator_pb2.Policy(slo_ms=50.0, min_accuracy=0.0, down_windows=2, up_windows=3,
                                        up_headroom=0.7, dwell_s=5.0, window_s=1.0, version=1,
                                        max_switches_per_minute=6)
ZERO_MEANS_DEFAULT = ("slo_ms", "down_windows", "up_windows", "up_headroom", "window_s", "max_switches_per_minute")
_CLOSE = object()
HEARTBEAT_S = 5.0  # an idle Connect stream carries an empty Directive this often: the edge hears the link is alive


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
    def __init__(self, db: FleetDB, catalog: Catalog, clock: Callable[[], float], heartbeat_s: float = HEARTBEAT_S):
        self._heartbeat_s = heartbeat_s
        self._db = db
        self._catalog = catalog
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[int, tuple[str, queue.Queue]] = {}
        if db.policy() is None:
            db.save_policy(DEFAULT_POLICY)
        self.rollouts = Rollouts(db, catalog, db.policy, self.push, clock)

    def _desired(self, edge: str) -> portfolio_pb2.ListVariantsResponse:
        """The portfolio `edge` should hold: its desired one, else (a new edge) the current one."""
        desired = self._db.desired(edge)
        if not desired or not self._catalog.known(desired):
            desired = self._catalog.current()
            self._db.set_desired([edge], desired)
        return self._catalog.listing(desired)

    def _policy_for(self, edge: str, pins: dict[str, str] | None = None) -> coordinator_pb2.Policy:
        """The policy, with the edge's own pin in place of the policy's when it has one."""
        policy = self._db.policy()
        pinned = (self._db.pins() if pins is None else pins).get(edge)
        if pinned:
            policy.pinned_variant = pinned
        return policy

    def push(self, edge: str, portfolio: portfolio_pb2.ListVariantsResponse) -> None:
        """Send a portfolio to `edge` if it is connected; otherwise it gets it when it registers."""
        with self._lock:
            for bound, outbox in self._streams.values():
                if bound == edge:
                    outbox.put(coordinator_pb2.Directive(portfolio=portfolio))

    def _connected(self) -> set[str]:
        with self._lock:
            return {edge for edge, _ in self._streams.values() if edge}

    def Register(self, request, context):
        if not _valid_edge_name(request.edge):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"edge name must be 1-{MAX_EDGE_NAME} characters of letters, digits, '-', '_' or '.'")
        self._db.register(request)
        log.info("edge %s registered at %s", request.edge, request.address)
        portfolio = self._desired(request.edge)
        return coordinator_pb2.RegisterResponse(policy=self._policy_for(request.edge), variants=portfolio.variants,
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
            outbox.put(coordinator_pb2.Directive(portfolio=self._desired(edge)))  # a rollout may have moved on
            outbox.put(coordinator_pb2.Directive(policy=self._policy_for(edge)))  # its own pin, if any
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
        sent_at = time.monotonic()
        try:
            while context.is_active():
                try:
                    item = outbox.get(timeout=min(0.5, self._heartbeat_s))
                except queue.Empty:
                    if time.monotonic() - sent_at < self._heartbeat_s:
                        continue
                    item = coordinator_pb2.Directive()  # the heartbeat: no body, nothing to apply
                if item is _CLOSE:
                    return
                if isinstance(item, tuple):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, item[1])
                sent_at = time.monotonic()
                yield item
        finally:
            with self._lock:
                self._streams.pop(stream_id, None)

    def _broadcast_policy(self) -> None:
        pins = self._db.pins()
        with self._lock:
            streams = list(self._streams.values())
        for edge, outbox in streams:
            outbox.put(coordinator_pb2.Directive(policy=self._policy_for(edge, pins)))

    def GetFleet(self, request, context):
        connected = self._connected()
        edges = self._db.edges()
        for edge in edges:
            edge.connected = edge.edge in connected
        policy, pins = self._db.policy(), self._db.pins()
        for edge in edges:
            edge.desired_policy_version = policy.version
            edge.pinned_variant = pins.get(edge.edge, "")
        return coordinator_pb2.GetFleetResponse(edges=edges, policy=policy, portfolio_id=self._catalog.current())

    def SetPolicy(self, request, context):
        try:
            policy = validate_policy(request.policy)
        except PolicyError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        known = {v.variant_id for v in self._catalog.listing().variants}
        if policy.pinned_variant and policy.pinned_variant not in known:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"pinned_variant {policy.pinned_variant[:80]!r} is not a variant of the current portfolio")
        policy.version = self._db.policy().version + 1
        self._db.save_policy(policy)
        self._broadcast_policy()
        log.info("policy v%d: slo %.1f ms", policy.version, policy.slo_ms)
        return coordinator_pb2.SetPolicyResponse(policy=policy)

    def ListEvents(self, request, context):
        if request.limit < 0 or request.limit > MAX_EVENTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be in [0, {MAX_EVENTS}]")
        events = self._db.events(request.edge, request.since, request.limit or 1000)
        return coordinator_pb2.ListEventsResponse(events=events)

    def Deploy(self, request, context):
        if len(request.portfolio) > 4096 or len(request.edges) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "portfolio and edges must be at most 4096 characters")
        try:
            return coordinator_pb2.DeployResponse(rollout=self.rollouts.deploy(request))
        except RolloutConflict as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except (RolloutError, StoreError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def Rollback(self, request, context):
        if request.rollout_id < 0 or len(request.reason) > 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rollout_id must be >= 0 and reason at most 1000 chars")
        try:
            rollout = self.rollouts.rollback(request.rollout_id, request.reason or "rolled back by an operator")
        except RolloutConflict as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except RolloutError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        return coordinator_pb2.RollbackResponse(rollout=rollout)

    def ListRollouts(self, request, context):
        if not 0 <= request.limit <= MAX_ROLLOUTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be in [0, {MAX_ROLLOUTS}]")
        return coordinator_pb2.ListRolloutsResponse(rollouts=self.rollouts.list(request.limit or 20))

    def Pin(self, request, context):
        if request.variant_id and self._catalog.file(request.variant_id) is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"variant_id {request.variant_id[:80]!r} is in no portfolio of this cloud")
        if not request.edges.strip() or len(request.edges) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "edges: name the edges to pin (names or patterns)")
        edges = select(self._db.edge_names(), request.edges)
        if not edges:
            context.abort(grpc.StatusCode.NOT_FOUND, f"selector {request.edges[:200]!r} matches no registered edge")
        self._db.set_pins(edges, request.variant_id)
        policy = self._db.policy()
        policy.version += 1  # the edges report the version they apply: desired vs reported
        self._db.save_policy(policy)
        self._broadcast_policy()
        log.info("%s %s", f"pinned to {request.variant_id[:12]}:" if request.variant_id else "unpinned:",
                 ", ".join(edges))
        return coordinator_pb2.PinResponse(edges=edges, policy=policy)
