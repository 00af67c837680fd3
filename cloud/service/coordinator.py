"""CoordinatorService: registration, the edge stream (reports up, policy and portfolio down, and
an empty heartbeat directive whenever the stream has been idle for `heartbeat_s`), fleet view, rollouts.

Edge streams are coroutines on the cloud's `grpc.aio` event loop (thousands, no thread each); their
reports are stored in batches by `ReportWriter`. The coordinator never decides for an edge's variant;
it stores what edges report, hands them the policy and the portfolio it wants each to hold (desired
state), and compares that with what each edge says it holds (reported state).

With mutual TLS an edge registers and reports only under its certificate's name (`common.identity`),
else PERMISSION_DENIED; in plaintext names are taken as given. A stream without a report within
`bind_timeout_s` ends DEADLINE_EXCEEDED: it would hold a slot (`cloud.service.callers`) for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor

import grpc

from cloud.service.callers import impersonation
from cloud.service.catalog import Catalog
from cloud.service.deploys import DeployConfig, Deploys
from cloud.service.edge_streams import CLOSE, EdgeStreams, Outbox
from cloud.service.fleet_db import FleetDB
from cloud.service.fleet_view import EventsQueryError, events_page, fleet_page
from cloud.service.interceptors import BadRequest
from cloud.service.paging import PageTokenError
from cloud.service.report_pace import ReportPace
from cloud.service.report_writer import ReportWriter
from cloud.service.rollout import RolloutConflict, RolloutError, Rollouts, select
from cloud.service.validation import DEFAULT_POLICY, PolicyError, register_problem, report_problem, validate_policy
from common.edge_input import edge_name_problem
from common.escaping import escaped, fitted
from common.files import short_id
from common.identity import peer_identity
from protos import coordinator_pb2, coordinator_pb2_grpc, portfolio_pb2

log = logging.getLogger(__name__)
MAX_ROLLOUTS = 1000
OPERATOR_METHODS = tuple(
    f"/prunefleet.v1.CoordinatorService/{m}"
    for m in ("GetFleet", "SetPolicy", "ListEvents", "Deploy", "Rollback", "ListRollouts", "Pin", "UploadPortfolio")
)
HEARTBEAT_S = 5.0  # an idle Connect stream carries an empty Directive this often: the edge hears the link is alive
BIND_TIMEOUT_S = 10.0  # a Connect stream without a first report is closed after this long


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """`Connect` is a coroutine on the cloud's event loop (one task per edge stream, no thread); the
    other RPCs are plain functions that the server runs in its thread pool. Reports go to the
    `ReportWriter`; the loop runs database reads in `blocking` (an executor), never itself. Edge input
    that `cloud.service.validation` refuses is counted by kind through `refused`."""

    def __init__(
        self,
        db: FleetDB,
        catalog: Catalog,
        clock: Callable[[], float],
        reports: ReportWriter,
        blocking: Executor | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        refused: Callable[[str], None] | None = None,
        bind_timeout_s: float = BIND_TIMEOUT_S,
        deploys: DeployConfig | None = None,
        pace: ReportPace | None = None,
    ):
        self._heartbeat_s, self._refused = heartbeat_s, refused or (lambda kind: None)
        self._bind_timeout_s, self._db, self._catalog, self._clock = bind_timeout_s, db, catalog, clock
        self._reports, self._blocking = reports, blocking
        self._broadcasting = threading.Lock()  # policy broadcasts one at a time: the newest goes out last
        self._streams = EdgeStreams(pace)  # one stream per edge, each read at its edge's pace
        if db.policy() is None:
            db.save_policy(DEFAULT_POLICY)
        deploys = deploys or DeployConfig()
        catalog.set_validity(deploys.listing_validity_s)
        self.rollouts = Rollouts(db, catalog, db.policy, self.push, clock, self._streams.connected)
        self.deploys = Deploys(catalog, self.rollouts, deploys, clock)  # the stores deploys name

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
        for outbox in self._streams.to(edge):
            outbox.put(coordinator_pb2.Directive(portfolio=portfolio))

    @property
    def streams(self) -> int:
        """Connect streams open now (bound to an edge or not yet)."""
        return len(self._streams)

    def connected(self) -> set[str]:
        """The edges whose stream is open now (retention never deletes them)."""
        return self._streams.connected()

    def revoked(self, edges: set[str]) -> None:
        """End the streams opened by these edges' certificates (revoked: `cloud.service.revocations`)."""
        self._streams.end_owned_by(edges, (grpc.StatusCode.PERMISSION_DENIED, "this edge's certificate is revoked"))

    def _refuse(self, kind: str, edge: str, problem: str) -> str:
        self._refused(kind)
        log.warning("refused %s from edge %s: %s", kind, fitted(edge, 128), escaped(problem))
        return problem

    def Register(self, request, context):
        if problem := impersonation(context, request.edge):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, self._refuse("register", request.edge, problem))
        if problem := register_problem(request):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._refuse("register", request.edge, problem))
        self._db.register(request)
        log.info("edge %s registered at %s", request.edge, escaped(request.address))
        portfolio = self._desired(request.edge)
        older = {"variants": portfolio.variants, "portfolio_id": portfolio.portfolio_id}  # for older edges
        return coordinator_pb2.RegisterResponse(policy=self._policy_for(request.edge), portfolio=portfolio, **older)

    async def _run_blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._blocking, function, *args)

    async def _consume(self, reports, stream_id: int, outbox: Outbox, context) -> None:
        try:
            async for report in reports:
                if problem := impersonation(context, report.edge):
                    outbox.put((grpc.StatusCode.PERMISSION_DENIED, self._refuse("report", report.edge, problem)))
                    return
                refusal = await self._accept(report, stream_id)
                if refusal:
                    outbox.put(refusal)
                    return
                await self._streams.paced(report.edge)  # the next report waits its turn
        except BadRequest as err:
            outbox.put((grpc.StatusCode.INVALID_ARGUMENT, str(err)))
        except grpc.RpcError:
            pass
        finally:
            outbox.put(CLOSE)

    async def _bind(self, edge: str, stream_id: int) -> bool:
        """Bind the stream to `edge` on its first report: the portfolio it should hold (a rollout may
        have moved on) and its own policy (its pin, if any) go down first."""
        if not await self._run_blocking(self._db.is_registered, edge):
            return False
        outbox = self._streams.bind(stream_id, edge)
        if outbox is None:  # the stream ended meanwhile
            return False
        outbox.put(coordinator_pb2.Directive(portfolio=await self._run_blocking(self._desired, edge)))
        await self._run_blocking(self._send_policy, edge, outbox)
        return True

    async def _accept(self, report: coordinator_pb2.EdgeReport, stream_id: int) -> tuple[grpc.StatusCode, str] | None:
        """Queue one report for storing; the refusal (code, message) that ends the stream, if any."""
        edge = report.edge
        bound = self._streams.bound_edge(stream_id)
        if (bound != edge or not edge) and (bound or edge_name_problem(edge) or not await self._bind(edge, stream_id)):
            return grpc.StatusCode.PERMISSION_DENIED, f"unknown or unregistered edge '{fitted(edge, 128)}'"
        kind = report.WhichOneof("body")
        if problem := report_problem(report):
            return grpc.StatusCode.INVALID_ARGUMENT, self._refuse(kind or "report", edge, problem)
        self._reports.put(report)
        if kind == "switch":
            log.info(
                "edge %s switched %s -> %s: %s",
                edge,
                short_id(report.switch.from_variant),
                short_id(report.switch.to_variant),
                escaped(report.switch.reason),
            )
        return None

    async def Connect(self, request_iterator, context):
        loop = asyncio.get_running_loop()
        outbox, caller = Outbox(loop), peer_identity(context)
        stream_id = self._streams.open(outbox, caller.name if caller else "")
        reader = asyncio.create_task(self._consume(request_iterator, stream_id, outbox, context))
        deadline = loop.time() + self._bind_timeout_s
        try:
            yield coordinator_pb2.Directive(policy=await self._run_blocking(self._db.policy))
            while True:
                unbound = not self._streams.bound_edge(stream_id)
                wait = min(self._heartbeat_s, max(deadline - loop.time(), 0.01)) if unbound else self._heartbeat_s
                try:
                    item = await asyncio.wait_for(outbox.get(), wait)
                except TimeoutError:
                    if loop.time() >= deadline and not self._streams.bound_edge(stream_id):
                        item = (grpc.StatusCode.DEADLINE_EXCEEDED, f"no report within {self._bind_timeout_s:g} s")
                    else:
                        item = coordinator_pb2.Directive()  # the heartbeat: no body, nothing to apply
                if item is CLOSE:
                    return
                if isinstance(item, tuple):
                    await context.abort(*item)
                yield item
        finally:
            reader.cancel()
            self._streams.close(stream_id)

    def _send_policy(self, edge: str, outbox: Outbox) -> None:
        """One stream's policy as stored now, queued in turn with the broadcasts (see `_broadcast_policy`)."""
        with self._broadcasting:
            outbox.put(coordinator_pb2.Directive(policy=self._policy_for(edge)))

    def _broadcast_policy(self) -> None:
        """Send every connected edge its policy as stored now. Sends run one at a time and each reads
        the policy inside, so when operator calls overlap, the latest version is queued last on every
        stream and no edge is left on an older one."""
        with self._broadcasting:
            pins = self._db.pins()
            for edge, outbox in self._streams.all():
                outbox.put(coordinator_pb2.Directive(policy=self._policy_for(edge, pins)))

    def GetFleet(self, request, context):
        self._reports.flush()  # every report an edge sent before this call is in the answer
        try:
            page = fleet_page(self._db, request, self._streams.connected(), self._catalog.current())
        except PageTokenError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        page.withdrawn_portfolios.extend(f"{pid}: {why}"[:1000] for pid, why in self._catalog.withdrawn().items())
        return page

    def SetPolicy(self, request, context):
        try:
            policy = validate_policy(request.policy)
        except PolicyError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        known = {v.variant_id for v in self._catalog.listing().variants}
        if policy.pinned_variant and policy.pinned_variant not in known:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"pinned_variant {policy.pinned_variant[:80]!r} is not a variant of the current portfolio",
            )
        policy = self._db.set_policy(policy)  # the database numbers it: concurrent calls get their own
        self._broadcast_policy()
        log.info("policy v%d: slo %.1f ms", policy.version, policy.slo_ms)
        return coordinator_pb2.SetPolicyResponse(policy=policy)

    def ListEvents(self, request, context):
        self._reports.flush()
        try:
            return events_page(self._db, request)
        except (PageTokenError, EventsQueryError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def Deploy(self, request, context):  # a known id, or a store under the portfolio root: cloud.service.deploys
        return self.deploys.deploy(request, context)

    def UploadPortfolio(self, request_iterator, context):
        return self.deploys.upload(request_iterator, context)

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
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"variant_id {request.variant_id[:80]!r} is in no portfolio of this cloud",
            )
        if not request.edges.replace(",", "").strip() or len(request.edges) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "edges: name the edges to pin (names or patterns)")
        edges = select(self._db.edge_names(), request.edges)
        if not edges:
            context.abort(grpc.StatusCode.NOT_FOUND, f"selector {request.edges[:200]!r} matches no registered edge")
        policy = self._db.pin(edges, request.variant_id)  # and a new policy version: edges report the one they apply
        self._broadcast_policy()
        log.info(
            "%s %s",
            f"pinned to {short_id(request.variant_id)}:" if request.variant_id else "unpinned:",
            ", ".join(edges),
        )
        return coordinator_pb2.PinResponse(edges=edges, policy=policy)
