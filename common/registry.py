"""Registries are plain dicts; `lookup` turns a miss into an error that lists the known names.

Some registries also accept a user object named by an import path, `package.module:function`.
`parse_import_path` checks such a path strictly (without importing anything) and `import_object`
imports it; whether a path may be imported at all is the caller's policy (see `common.models.resolve`).
"""

import importlib
import keyword
import re
from collections.abc import Mapping
from typing import TypeVar

from common.errors import PrunefleetError

T = TypeVar("T")

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"({_IDENTIFIER}(?:\.{_IDENTIFIER})*):({_IDENTIFIER})")
MAX_IMPORT_PATH_CHARS = 256
# the edge's allow-list of import-path architectures (`common.models.parse_allow_list`), read by the edge
# CLI's main(), never at import time; here rather than in `common.models` so the CLI reads it without torch
ALLOW_ENV = "PRUNEFLEET_ALLOW_MODELS"


class UnknownNameError(PrunefleetError, KeyError):
    """A name that a registry does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


class ImportPathError(PrunefleetError, ValueError):
    """An import path that is malformed, or whose module or attribute cannot be imported."""


def lookup(registry: Mapping[str, T], kind: str, name: str) -> T:
    """Return registry[name] or raise UnknownNameError naming every known entry."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}") from None


def is_import_path(name: str) -> bool:
    """Whether `name` is meant as an import path (it has a colon); `parse_import_path` checks it."""
    return ":" in name


def parse_import_path(path: str) -> tuple[str, str]:
    """Split `package.module:function` into (module, attribute) after a strict check of its syntax:
    ASCII dotted identifiers, exactly one colon, one identifier after it, no keywords, no blanks."""
    if not isinstance(path, str) or len(path) > MAX_IMPORT_PATH_CHARS:
        raise ImportPathError(f"import path must be a string of at most {MAX_IMPORT_PATH_CHARS} characters")
    match = _IMPORT_PATH.fullmatch(path)
    parts = (match.group(1).split(".") + [match.group(2)]) if match else []
    if not match or any(keyword.iskeyword(part) for part in parts):
        raise ImportPathError(
            f"malformed import path {path!r}; expected package.module:function "
            "(dotted Python identifiers, one colon, a function name)"
        )
    return match.group(1), match.group(2)


def import_object(path: str) -> object:
    """Import `package.module:function` and return the attribute; errors name the path."""
    module_name, attribute = parse_import_path(path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ImportPathError(
            f"cannot import {path!r}: no module named {err.name!r} (is it installed or on PYTHONPATH?)"
        ) from err
    except Exception as err:  # the user's module ran and failed: report it, whatever it raised
        raise ImportPathError(
            f"cannot import {path!r}: importing {module_name} failed: {type(err).__name__}: {err}"
        ) from err
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportPathError(f"cannot import {path!r}: module {module_name} has no attribute {attribute!r}") from None
