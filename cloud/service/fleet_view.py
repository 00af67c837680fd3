"""The operator's view of the fleet, a page at a time: `GetFleet` and `ListEvents` answered from the
fleet database (`cloud.service.fleet_pages`) with page sizes and tokens (`cloud.service.paging`).

A page of the fleet adds what the database does not hold alone: whether each edge's stream is open
now, the policy version it should apply and its own pin. Request problems are `PageTokenError`s
(naming `page_token` or `page_size`) or `EventsQueryError`s, which the servicer answers with
INVALID_ARGUMENT.
"""

from __future__ import annotations

import math

from cloud.service import fleet_pages, paging
from cloud.service.fleet_db import FleetDB
from common.errors import PrunefleetError
from protos import coordinator_pb2

MAX_LIMIT = 10_000  # ListEvents' `limit`, the page size of callers from before paging


class EventsQueryError(PrunefleetError, ValueError):
    """A ListEvents query that cannot be answered; the message names the field."""


def fleet_page(
    db: FleetDB, request: coordinator_pb2.GetFleetRequest, connected: set[str], portfolio_id: str
) -> coordinator_pb2.GetFleetResponse:
    """One page of the fleet as the request asks for it."""
    size = paging.FLEET_PAGE.of(request.page_size)
    page = fleet_pages.edges_page(db, paging.decode(request.page_token, "GetFleet", []), size)
    policy, pins = db.policy(), db.pins()
    for edge in page.items:
        edge.connected = edge.edge in connected
        edge.desired_policy_version = policy.version
        edge.pinned_variant = pins.get(edge.edge, "")
    return coordinator_pb2.GetFleetResponse(
        edges=page.items,
        policy=policy,
        portfolio_id=portfolio_id,
        next_page_token=paging.next_token("GetFleet", [], page.keys, page.more),
    )


def events_page(db: FleetDB, request: coordinator_pb2.ListEventsRequest) -> coordinator_pb2.ListEventsResponse:
    """One page of switch events as the request asks for it (the query is its edge and `since`)."""
    if not 0 <= request.limit <= MAX_LIMIT or math.isnan(request.since):
        raise EventsQueryError(f"limit must be in [0, {MAX_LIMIT}] and since a number")
    size = paging.EVENTS_PAGE.of(request.page_size or request.limit)
    query = [request.edge, request.since]
    page = fleet_pages.events_page(
        db, request.edge, request.since, paging.decode(request.page_token, "ListEvents", query), size
    )
    return coordinator_pb2.ListEventsResponse(
        events=page.items, next_page_token=paging.next_token("ListEvents", query, page.keys, page.more)
    )
