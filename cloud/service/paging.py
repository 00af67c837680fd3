"""Paged answers of the operator's list RPCs (`GetFleet`, `ListEvents`): page sizes and page tokens.

A page holds at most `page_size` items (0: the RPC's default; above its maximum: the maximum) and at
most `PAGE_BYTES` of them, whatever the items hold, so a page always fits in a gRPC message. A reply
whose list goes on carries `next_page_token`; the caller sends it back as `page_token` for the next
page, with the same query, until a reply carries none. Pages are keyset pages: a token holds where
the last page ended (an edge's name, an event's time and id), never an offset, so items added or
removed between two calls neither repeat nor shift the rest.

A token is opaque to callers: URL-safe base64 of a small JSON document naming the RPC and the query
it was given for. A token that does not decode, or that was given for another RPC or query, is a
`PageTokenError` (INVALID_ARGUMENT naming `page_token`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from common.errors import PrunefleetError

PAGE_BYTES = 4 << 20  # half the message limit: the reply's other fields and framing fit beside it
MAX_TOKEN_CHARS = 1024
_FORMAT = 1


class PageTokenError(PrunefleetError, ValueError):
    """A page_token or page_size this cloud cannot page by; the message names the field."""


@dataclass(frozen=True)
class PageSize:
    """An RPC's page sizes: what 0 means, and the most one page holds."""

    default: int
    maximum: int

    def __post_init__(self) -> None:
        if not 1 <= self.default <= self.maximum:
            raise ValueError("page sizes: 1 <= default <= maximum")

    def of(self, requested: int) -> int:
        if requested < 0:
            raise PageTokenError(f"page_size must be >= 0 (0: {self.default}, at most {self.maximum}), got {requested}")
        return min(requested or self.default, self.maximum)


FLEET_PAGE = PageSize(default=1000, maximum=1000)
EVENTS_PAGE = PageSize(default=1000, maximum=10_000)


def encode(rpc: str, query: list, after: list) -> str:
    """The token of the page that follows the item `after` (its key) in `rpc`'s answer to `query`."""
    text = json.dumps([_FORMAT, rpc, query, after], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(token: str, rpc: str, query: list) -> list | None:
    """The key the page after which `token` asks for, or None for the first page (token "")."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise PageTokenError(f"page_token is {len(token)} characters long; a token of this cloud is shorter")
    try:
        padded = token + "=" * (-len(token) % 4)
        form, given_rpc, given_query, after = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise PageTokenError("page_token is not a token this cloud gave: send next_page_token as it came") from None
    if form != _FORMAT or given_rpc != rpc or given_query != query or not isinstance(after, list):
        raise PageTokenError(f"page_token was given for another query than this {rpc}: keep the query while paging")
    return after


def next_token(rpc: str, query: list, keys: list[list], more: bool) -> str:
    """The reply's next_page_token: after the page's last key when more items follow, else ""."""
    return encode(rpc, query, keys[-1]) if more and keys else ""


def within_bytes(sizes: list[int], budget: int = PAGE_BYTES) -> int:
    """How many of the items of these serialized sizes one page holds: at least one, and no more than
    fit in `budget` bytes together."""
    total = 0
    for count, size in enumerate(sizes):
        total += size + 8  # the field's tag and length
        if total > budget and count:
            return count
    return len(sizes)
