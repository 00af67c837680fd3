"""Rollouts: a new portfolio goes to a few canary edges first, and to the rest only if they stay healthy.

    deploy    record the rollout and each covered edge's previous portfolio, make the canaries' desired
              portfolio the new one and push it to them (an offline canary gets it when it registers).
              The portfolio is one the catalog already holds, checked and hashed before (by
              `cloud.service.deploys`, without this module's lock). Canaries are the edges the
              operator names, else the covered edges registered earliest (before the deploy began):
              a name registered just before a deploy, however it sorts, never takes the place.
    tick      once the canaries report holding it, judge the telemetry windows they report on it: SLO
              attainment (share of windows with p95 <= the policy's SLO) and error rate. Past a threshold
              the rollout rolls back on its own; once every canary has `min_windows` healthy windows it
              is promoted to every covered edge. Canaries that do not hold it within `adopt_timeout_s`
              (a refused signature, a failed download) also roll it back.
    rollback  every covered edge's desired portfolio goes back to what it was, and is pushed.
    refresh   when half of the listings' validity has passed (`Catalog.due`), issued again.

Each of these issues a new listing version (`Catalog.issue`, in the change's transaction) and pushes
every connected edge its listing under it, changed or not: each holds the newest version, unexpired (a
rollback is a new version, which edges accept; the older listing replayed, they refuse).

Everything is in the fleet database, so a restarted coordinator carries on with the rollout it was judging;
each change of a rollout commits fully synchronously (`FleetDB.transaction(durable=True)`) before any
edge is told of it. Windows without requests carry no evidence and are not counted.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloud.service.catalog import Catalog
from cloud.service.fleet_db import FleetDB
from common.errors import PrunefleetError
from protos import coordinator_pb2, portfolio_pb2

log = logging.getLogger(__name__)
DEFAULTS = coordinator_pb2.RolloutThresholds(
    min_slo_attainment=0.9, max_error_rate=0.05, min_windows=5, adopt_timeout_s=300.0
)
CANARY, COMPLETE, ROLLED_BACK = "canary", "complete", "rolled_back"


class RolloutError(PrunefleetError, ValueError):
    """A deploy or rollback that cannot be done as asked; the message says why."""


class RolloutConflict(RolloutError):
    """Another rollout is in progress, or this one is already over."""


def thresholds(given: coordinator_pb2.RolloutThresholds) -> coordinator_pb2.RolloutThresholds:
    merged = coordinator_pb2.RolloutThresholds()
    merged.CopyFrom(given)
    for field in ("min_slo_attainment", "max_error_rate", "min_windows", "adopt_timeout_s"):
        if getattr(merged, field) == 0:
            setattr(merged, field, getattr(DEFAULTS, field))
    if not (0 < merged.min_slo_attainment <= 1 and 0 < merged.max_error_rate <= 1):
        raise RolloutError("min_slo_attainment and max_error_rate must be in (0, 1]")
    if not (1 <= merged.min_windows <= 10_000 and 0 < merged.adopt_timeout_s <= 86_400):
        raise RolloutError("min_windows must be in [1, 10000] and adopt_timeout_s in (0, 86400]")
    return merged


def select(names: list[str], selector: str) -> list[str]:
    """Edges whose name matches any comma-separated name or shell pattern ("" = every edge)."""
    patterns = [p.strip() for p in selector.split(",") if p.strip()] or ["*"]
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def canaries(edges: list[str], named: str, count: int, registered: list[tuple[str, float]], began: float) -> list[str]:
    """The canaries of a rollout covering `edges`: those `named` (comma-separated, each one of them),
    else the first `count` (at least 1) of `edges` by registration (`registered`: (name, time) in the
    order the edges registered), among those registered before `began` when there are any."""
    if named.strip():
        chosen = list(dict.fromkeys(n.strip() for n in named.split(",") if n.strip()))
        outside = [n for n in chosen if n not in edges]
        if outside:
            raise RolloutError(f"canaries {', '.join(outside)[:200]!r} are not among the edges the rollout covers")
        return chosen
    covered = set(edges)
    order = [name for name, at in registered if name in covered]
    earlier = [name for name, at in registered if name in covered and at < began]
    return (earlier or order)[: max(1, count)]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "wait", "pass" or "fail"
    reason: str


def judge(
    windows: list[tuple[str, float, int, int]],
    canaries: list[str],
    slo_ms: float,
    limits: coordinator_pb2.RolloutThresholds,
) -> Verdict:
    """Judge canary windows (edge, p95_ms, requests, errors): fail as soon as `min_windows` windows are
    past a threshold, pass once every canary has `min_windows` windows within both."""
    used = [w for w in windows if w[2] > 0]
    if len(used) < limits.min_windows:
        return Verdict("wait", f"{len(used)} of {limits.min_windows} windows with requests")
    requests, errors = sum(w[2] for w in used), sum(w[3] for w in used)
    error_rate = errors / requests
    attainment = sum(1 for w in used if w[1] <= slo_ms) / len(used)
    summary = (
        f"SLO attainment {100 * attainment:.0f}% (min {100 * limits.min_slo_attainment:.0f}%), "
        f"error rate {100 * error_rate:.1f}% (max {100 * limits.max_error_rate:.1f}%) over {len(used)} windows"
    )
    if error_rate > limits.max_error_rate or attainment < limits.min_slo_attainment:
        return Verdict("fail", summary)
    if all(sum(1 for w in used if w[0] == edge) >= limits.min_windows for edge in canaries):
        return Verdict("pass", summary)
    return Verdict("wait", summary)


Push = Callable[[str, portfolio_pb2.ListVariantsResponse], None]


class Rollouts:
    def __init__(
        self,
        db: FleetDB,
        catalog: Catalog,
        policy: Callable[[], coordinator_pb2.Policy],
        push: Push,
        clock: Callable[[], float],
        connected: Callable[[], set[str]] | None = None,
    ):
        self._db, self._catalog, self._policy, self._push, self._clock = db, catalog, policy, push, clock
        self._connected = connected or (lambda: set(db.edge_names()))  # whom pushes reach
        self._lock = threading.RLock()  # deploy, rollback and tick one at a time

    # --- storage ---------------------------------------------------------------------------------------
    def _save(self, rollout: coordinator_pb2.Rollout, extra: list[tuple[str, tuple]] = ()) -> None:
        """Store the rollout with `extra` and a new listing version, durably (`Catalog.issue`)."""
        rollout.updated_at = self._clock()
        update = "UPDATE rollouts SET state = ?, rollout = ? WHERE id = ?"
        self._catalog.issue([(update, (rollout.state, rollout.SerializeToString(), rollout.id)), *extra])

    def get(self, rollout_id: int = 0) -> coordinator_pb2.Rollout | None:
        sql = "SELECT rollout FROM rollouts " + ("WHERE id = ?" if rollout_id else "ORDER BY id DESC LIMIT 1")
        rows = self._db.query(sql, (rollout_id,) if rollout_id else ())
        return coordinator_pb2.Rollout.FromString(rows[0][0]) if rows else None

    def active(self) -> coordinator_pb2.Rollout | None:
        rows = self._db.query("SELECT rollout FROM rollouts WHERE state = ? ORDER BY id DESC LIMIT 1", (CANARY,))
        return coordinator_pb2.Rollout.FromString(rows[0][0]) if rows else None

    def list(self, limit: int = 20) -> list[coordinator_pb2.Rollout]:
        rows = self._db.query("SELECT rollout FROM rollouts ORDER BY id DESC LIMIT ?", (limit,))
        return [coordinator_pb2.Rollout.FromString(r[0]) for r in rows]

    def _previous(self, rollout_id: int) -> dict[str, str]:
        rows = self._db.query("SELECT edge, previous FROM rollout_edges WHERE rollout_id = ?", (rollout_id,))
        return dict(rows)

    def _send(self, edges: list[str], portfolio_id: str) -> list[tuple[str, tuple]]:
        """Statements making `portfolio_id` the desired portfolio of `edges`; pushed after they commit."""
        return [("UPDATE edges SET desired_portfolio = ? WHERE name = ?", (portfolio_id, e)) for e in edges]

    def _push_all(self, changed: list[str] = ()) -> None:
        """Push every connected edge the listing it should hold, under the current version: the edges in
        `changed` (whose portfolio changed) first."""
        connected = self._connected()
        for edge, listing in self._catalog.desired([*changed, *sorted(connected - set(changed))], connected):
            self._push(edge, listing)

    # --- operations -------------------------------------------------------------------------------------
    def deploy(self, request: coordinator_pb2.DeployRequest, began: float | None = None) -> coordinator_pb2.Rollout:
        """Start a rollout of `request.portfolio`, a portfolio id the catalog holds; `began`: when the
        operator's deploy began (default now), which edges must have registered before to be chosen
        as canaries."""
        if not self._catalog.known(request.portfolio):
            raise RolloutError(f"portfolio {request.portfolio[:200]!r} is not a portfolio id known to this cloud")
        with self._lock:
            return self._deploy(request, self._clock() if began is None else began)

    def rollback(self, rollout_id: int = 0, reason: str = "rolled back by an operator") -> coordinator_pb2.Rollout:
        with self._lock:
            return self._rollback(rollout_id, reason)

    def tick(self) -> coordinator_pb2.Rollout | None:
        """Judge the rollout in its canary phase, if any; returns it after any change of state."""
        with self._lock:
            return self._tick()

    def _deploy(self, request: coordinator_pb2.DeployRequest, began: float) -> coordinator_pb2.Rollout:
        limits = thresholds(request.thresholds)
        if request.canary < 0:
            raise RolloutError("canary must be >= 0")
        running = self.active()
        if running is not None:
            raise RolloutConflict(f"rollout {running.id} is still in its canary phase; wait or roll it back")
        portfolio_id = request.portfolio
        edges = select(self._db.edge_names(), request.edges)
        if not edges:
            raise RolloutError(f"selector {request.edges[:200]!r} matches no registered edge")
        chosen = canaries(edges, request.canaries, request.canary, self._db.registrations(), began)
        current = self._catalog.current()
        now = self._clock()
        rollout = coordinator_pb2.Rollout(
            portfolio_id=portfolio_id,
            selector=request.edges or "*",
            canary_edges=chosen,
            edges=edges,
            state=CANARY,
            reason=f"waiting for {len(chosen)} canary edge(s) to hold it",
            created_at=now,
            updated_at=now,
            thresholds=limits,
            previous_portfolio_id=current,
        )
        previous = {e: self._db.desired(e) or current for e in edges}
        rollout.id = self._db.query("SELECT COALESCE(MAX(id), 0) + 1 FROM rollouts")[0][0]
        covered = [
            (
                "INSERT INTO rollout_edges (rollout_id, edge, previous, canary) VALUES (?, ?, ?, ?)",
                (rollout.id, e, previous[e], int(e in chosen)),
            )
            for e in edges
        ]
        self._catalog.issue(
            [
                (
                    "INSERT INTO rollouts (id, state, rollout) VALUES (?, ?, ?)",
                    (rollout.id, CANARY, rollout.SerializeToString()),
                ),
                *covered,
                *self._send(chosen, portfolio_id),
            ]
        )
        self._push_all(chosen)
        log.info("rollout %d: portfolio %s to canaries %s", rollout.id, portfolio_id, ", ".join(chosen))
        return rollout

    def _rollback(self, rollout_id: int, reason: str) -> coordinator_pb2.Rollout:
        rollout = self.get(rollout_id)
        if rollout is None:
            raise RolloutError(f"no rollout {rollout_id}" if rollout_id else "no rollout to roll back")
        if rollout.state == ROLLED_BACK:
            raise RolloutConflict(f"rollout {rollout.id} was already rolled back: {rollout.reason}")
        previous = self._previous(rollout.id)
        by_portfolio: dict[str, list[str]] = {}
        for edge, portfolio_id in previous.items():
            by_portfolio.setdefault(portfolio_id, []).append(edge)
        statements = [s for pid, edges in by_portfolio.items() for s in self._send(edges, pid)]
        if self._catalog.current() == rollout.portfolio_id and rollout.previous_portfolio_id:
            statements.append(
                (
                    "INSERT OR REPLACE INTO settings (key, value) VALUES ('portfolio', ?)",
                    (rollout.previous_portfolio_id,),
                )
            )
        rollout.state, rollout.reason = ROLLED_BACK, reason
        self._save(rollout, statements)
        self._push_all(sorted(previous))
        log.warning("rollout %d rolled back: %s", rollout.id, reason)
        return rollout

    def _promote(self, rollout: coordinator_pb2.Rollout, reason: str) -> None:
        rest = [e for e in rollout.edges if e not in rollout.canary_edges]
        statements = self._send(rest, rollout.portfolio_id)
        if rollout.selector == "*":  # the whole fleet: new edges get it too
            statements.append(
                ("INSERT OR REPLACE INTO settings (key, value) VALUES ('portfolio', ?)", (rollout.portfolio_id,))
            )
        rollout.state, rollout.reason = COMPLETE, f"canaries healthy: {reason}"
        self._save(rollout, statements)
        self._push_all(rest)
        log.info("rollout %d promoted to %d edge(s): %s", rollout.id, len(rest), reason)

    def _tick(self) -> coordinator_pb2.Rollout | None:
        if self._catalog.due() and self._catalog.issue():  # refreshed before the edges' listings expire
            self._push_all()
        rollout = self.active()
        if rollout is None:
            return None
        canaries = list(rollout.canary_edges)
        reported = self._db.reported(canaries)
        waiting = [e for e in canaries if reported.get(e) != rollout.portfolio_id]
        if waiting:
            if self._clock() - rollout.created_at > rollout.thresholds.adopt_timeout_s:
                return self._rollback(
                    rollout.id,
                    f"canary edge(s) {', '.join(waiting)} did not hold portfolio "
                    f"{rollout.portfolio_id} within {rollout.thresholds.adopt_timeout_s:.0f} s",
                )
            return None
        windows = self._db.windows(canaries, rollout.portfolio_id, rollout.created_at)
        verdict = judge(windows, canaries, self._policy().slo_ms, rollout.thresholds)
        if verdict.outcome == "fail":
            return self._rollback(rollout.id, f"canary unhealthy: {verdict.reason}")
        if verdict.outcome == "pass":
            self._promote(rollout, verdict.reason)
            return rollout
        return None
