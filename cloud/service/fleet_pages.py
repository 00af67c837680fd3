"""The fleet database read a page at a time: edges by name, switch events newest first.

Each page is a keyset page (see `cloud.service.paging`): the edges after a name, the events before a
(timestamp, id). A page holds at most the size asked for and at most `paging.PAGE_BYTES` of items,
so any fleet reads through messages under the limit. A stored report larger than any valid one (an
older coordinator stored reports unchecked) is left out of what is read (`MAX_ROW_BYTES`), so it
cannot make a page too large to send.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud.service import paging
from cloud.service.fleet_schema import MAX_ROW_BYTES
from protos import coordinator_pb2

_EDGE_COLUMNS = (
    "name, address, metrics_address, registered_at, last_seen, "
    f"CASE WHEN length(telemetry) <= {MAX_ROW_BYTES} THEN telemetry END, "
    "policy_version, desired_portfolio, reported_portfolio"
)


@dataclass(frozen=True)
class Page:
    """Items of one page, the key of each (for the next page's token), and whether more follow."""

    items: list
    keys: list[list]
    more: bool


def _status(row: tuple, profiles: list) -> coordinator_pb2.EdgeStatus:
    name, address, metrics, registered, seen, blob, version, desired, reported = row
    return coordinator_pb2.EdgeStatus(
        edge=name,
        address=address or "",
        metrics_address=metrics or "",
        registered_at=registered or 0.0,
        last_seen=seen or 0.0,
        policy_version=version or 0,
        profiles=profiles,
        telemetry=coordinator_pb2.Telemetry.FromString(blob) if blob else None,
        desired_portfolio_id=desired or "",
        reported_portfolio_id=reported or "",
    )


def _profiles(db, first: str, last: str) -> dict[str, list]:
    """The profiles of the edges named `first` to `last`, by edge, in variant order."""
    found: dict[str, list] = {}
    rows = db.query(
        "SELECT edge, profile FROM profiles WHERE edge >= ? AND edge <= ? AND length(profile) <= ? "
        "ORDER BY edge, variant_id",
        (first, last, MAX_ROW_BYTES),
    )
    for edge, blob in rows:
        found.setdefault(edge, []).append(coordinator_pb2.VariantProfile.FromString(blob))
    return found


def edges_page(db, after: list | None, size: int) -> Page:
    """The edges named after `after` ([name]; None: from the first), at most `size`, with their profiles."""
    if after is not None and (len(after) != 1 or not isinstance(after[0], str)):
        raise paging.PageTokenError("page_token does not name where a GetFleet page ended")
    where, args = ("WHERE name > ? ", (after[0],)) if after is not None else ("", ())
    rows = db.query(f"SELECT {_EDGE_COLUMNS} FROM edges {where}ORDER BY name LIMIT ?", (*args, size + 1))
    more, rows = len(rows) > size, rows[:size]
    profiles = _profiles(db, rows[0][0], rows[-1][0]) if rows else {}
    edges = [_status(row, profiles.get(row[0], [])) for row in rows]
    kept = paging.within_bytes([edge.ByteSize() for edge in edges])
    return Page(edges[:kept], [[edge.edge] for edge in edges[:kept]], more or kept < len(edges))


def all_edges(db) -> list[coordinator_pb2.EdgeStatus]:
    """Every edge, page after page."""
    edges, after = [], None
    while True:
        page = edges_page(db, after, paging.FLEET_PAGE.maximum)
        edges += page.items
        if not page.more:
            return edges
        after = page.keys[-1]


def events_page(db, edge: str, since: float, before: list | None, size: int) -> Page:
    """Switch events at or after `since` (of `edge`, or of every edge when ""), the newest first from
    just before `before` ([timestamp, id]; None: from the newest), at most `size`; the page's items
    are listed oldest first, as a log reads."""
    if before is not None and (
        len(before) != 2 or not isinstance(before[0], int | float) or not isinstance(before[1], int)
    ):
        raise paging.PageTokenError("page_token does not name where a ListEvents page ended")
    sql = "SELECT id, edge, timestamp, event FROM events WHERE timestamp >= ? AND length(event) <= ?"
    args = [since, MAX_ROW_BYTES]
    if edge:
        sql, args = sql + " AND edge = ?", args + [edge]
    if before is not None:
        sql, args = sql + " AND (timestamp < ? OR (timestamp = ? AND id < ?))", args + [before[0], *before]
    rows = db.query(sql + " ORDER BY timestamp DESC, id DESC LIMIT ?", (*args, size + 1))
    more, rows = len(rows) > size, rows[:size]
    kept = paging.within_bytes([len(blob) + len(name) + 8 for _, name, _, blob in rows])
    more, rows = more or kept < len(rows), rows[:kept]
    events = [
        coordinator_pb2.EdgeEvent(edge=name, event=coordinator_pb2.SwitchEvent.FromString(blob))
        for _, name, _, blob in reversed(rows)
    ]
    return Page(events, [[timestamp, row_id] for row_id, _, timestamp, _ in rows], more)
