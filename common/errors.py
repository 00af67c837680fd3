"""The base of every error prunefleet raises on purpose.

Each error also keeps the built-in base that says what kind of failure it is (`ValueError` for bad
input, `LookupError` for a missing name, `RuntimeError` for a step that failed), so callers that
want one kind can still catch it; a caller that reports any project error to a person catches
`PrunefleetError` instead of a long list.
"""


class PrunefleetError(Exception):
    """An error prunefleet raised on purpose, with a message that names the problem."""
