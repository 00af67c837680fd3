"""Registries are plain dicts; `lookup` turns a miss into an error that lists the known names."""

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that a registry does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    """Return registry[name] or raise UnknownNameError naming every known entry."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}") from None
