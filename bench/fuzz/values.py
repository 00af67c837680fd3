"""Field values that break servers, as hypothesis strategies, for `bench.fuzz.cases` to build requests from.

Numbers at and past their type's limits, NaN and infinities, empty, very long and path-like strings
(`../x`), mixed with plain random values; and the two ways a message is put together from them: a
field often valid and otherwise wild (`either`), and a message valid but for one or two wild fields
(`one_wild`), so that a bad value gets past the first check and reaches the one meant for it. Page
tokens (`page_tokens`) are the cloud's own, for the right query and the wrong one, and random text.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from cloud.service import paging

INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
SPECIAL_TEXTS = (
    "",
    "../x",
    "../../etc/passwd",
    "/",
    ".",
    "a" * 300,
    "*",
    ",",
    " , ",
    "x\x00y",
    "é",
    "0" * 64,
    "A" * 64,
    "edge one",
    "-",
    "[",
    "**/*",
)
SPECIAL_FLOATS = (0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -1.0, 0.5, 1.0, 1e9)


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*INT64), st.integers(-3, 3), st.sampled_from(INT64))


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*INT32), st.integers(-3, 3), st.sampled_from(INT32))


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from((math.inf, -math.inf, math.nan)),
        st.sampled_from(SPECIAL_FLOATS),
        st.floats(),
        st.floats(0, 100),
    )


def either(wild: st.SearchStrategy, *good) -> st.SearchStrategy:
    """A field that is often valid (one of `good`) and otherwise wild, so that requests with one bad
    field among good ones get past the first check and reach the deeper ones."""
    return st.one_of(st.sampled_from(good), wild) if good else wild


def one_wild(message: type, good: dict, wild: dict, most: int = 2) -> st.SearchStrategy:
    """A message whose fields are drawn valid (`good`: field -> values) but for up to `most` of them,
    drawn wild: a bad value among good ones reaches the check meant for it instead of failing earlier."""

    @st.composite
    def build(draw):
        valid = draw(st.integers(0, 3)) == 0  # a quarter of them entirely valid
        chosen = set() if valid else draw(st.sets(st.sampled_from(sorted(wild)), min_size=1, max_size=most))
        return message(
            **{
                name: draw(wild[name]) if name in chosen else draw(st.sampled_from(values))
                for name, values in good.items()
            }
        )

    return build()


def texts(*known: str) -> st.SearchStrategy[str]:
    """Random, special, very long, and (when given) known valid strings."""
    long = st.builds(lambda c, n: c * n, st.sampled_from(("a", "/", "*", "é", "../")), st.integers(1000, 20_000))
    options = [st.text(max_size=40), st.sampled_from(SPECIAL_TEXTS), long]
    if known:
        options.append(st.sampled_from(known))
    return st.one_of(*options)


def page_tokens(rpc: str, query: list, keys: tuple) -> st.SearchStrategy[str]:
    """Page tokens: the cloud's own for this query (after each of `keys`), for another RPC or query,
    with keys of the wrong kind, and random text."""
    own = tuple(paging.encode(rpc, query, key) for key in keys)
    wrong = (
        paging.encode("Other", query, keys[0]),
        paging.encode(rpc, ["other"], keys[0]),
        paging.encode(rpc, query, [{}]),
    )
    return st.one_of(st.sampled_from(own + wrong), texts())
