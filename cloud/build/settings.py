"""Command-line flags generated from a frozen settings dataclass, and the dataclass built back from them.

A component states its settings once, as a dataclass whose fields carry their help text
(`field(default=..., metadata={"help": "..."})`); the flags follow from it, so a new setting is a new
field and nothing else. Field `rewind_iteration` becomes `--rewind-iteration` (`metadata={"flag":
"--other-name"}` renames it, `metadata={"cli": False}` keeps it off the command line), its type comes
from the annotation (int, float, str, bool, Path, `tuple[float, ...]` and `tuple[str, ...]` as
comma-separated lists, and any of those `| None`), and a field without a default is a required flag.

A flag left off the command line leaves the attribute out of the parsed namespace, so the dataclass
keeps its own default and its `__post_init__` stays the single place that validates settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path

from common.errors import PrunefleetError

_SCALARS: dict[type, Callable[[str], object]] = {int: int, float: float, str: str, Path: Path}
_LIST_WORDS = {float: "numbers", int: "integers", str: "names"}


class SettingsError(PrunefleetError, ValueError):
    """Settings that cannot be turned into flags or built from them; the message names the field or flag."""


def _list_of(kind: type) -> Callable[[str], tuple]:
    """A parser of comma-separated values of `kind`; blanks are skipped, so '' is the empty list."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {_LIST_WORDS[kind]}, got {text!r}") from None

    parse.__name__ = f"list of {_LIST_WORDS[kind]}"
    return parse


def _converter(owner: type, name: str, annotation: object) -> Callable[[str], object] | None:
    """How a flag's text becomes the field's value; None for a bool (a --flag/--no-flag pair)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = others[0] if len(others) == 1 else annotation
    if annotation is bool:
        return None
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _LIST_WORDS:
        return _list_of(args[0])
    raise SettingsError(f"{owner.__name__}.{name}: no command-line flag for type {annotation!r}")


def _flagged(cls: type) -> list[dataclasses.Field]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise SettingsError(f"{cls!r} is not a settings dataclass")
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flags(cls: type) -> dict[str, str]:
    """Field name -> its flag, for every field of `cls` on the command line."""
    named = {f.name: f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in _flagged(cls)}
    for name, flag in named.items():
        if not (isinstance(flag, str) and flag.startswith("--") and len(flag) > 2):
            raise SettingsError(f"{cls.__name__}.{name}: flag {flag!r} must start with --")
    return named


def _dest(cls: type, name: str) -> str:
    """Where argparse keeps a field's value: named by the class, so it never meets another command's."""
    return f"{cls.__module__}.{cls.__qualname__}.{name}"


def _shown(value: object) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_arguments(parser, cls: type, owner: str, taken: dict[str, str] | None = None) -> None:
    """Add a flag for every field of `cls` to `parser` (a parser or an argument group).

    `taken` maps the flags added so far to their owners; a flag some other owner already has is refused
    with both owners named, before argparse sees it."""
    taken = {} if taken is None else taken
    hints = typing.get_type_hints(cls)
    for f, flag in zip(_flagged(cls), flags(cls).values()):
        text = f.metadata.get("help")
        if not text:
            raise SettingsError(f"{cls.__name__}.{f.name} has no help text (field metadata 'help')")
        convert = _converter(cls, f.name, hints[f.name])
        options = [flag] if convert else [flag, "--no-" + flag.removeprefix("--")]
        for option in options:
            if option in taken:
                raise SettingsError(f"flag {option} of {owner} clashes with {option} of {taken[option]}")
        taken.update(dict.fromkeys(options, owner))
        default = _default(f)
        text += " (required)" if default is dataclasses.MISSING else f" (default: {_shown(default)})"
        common = {"dest": _dest(cls, f.name), "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if convert is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)  # adds the --no- form
        else:
            metavar = f.name.upper() + (",..." if typing.get_origin(hints[f.name]) is tuple else "")
            required = default is dataclasses.MISSING
            parser.add_argument(flag, type=convert, metavar=metavar, required=required, **common)


def given(cls: type, args: argparse.Namespace) -> list[str]:
    """The flags of `cls` that the command line set."""
    return [flag for name, flag in flags(cls).items() if hasattr(args, _dest(cls, name))]


def from_arguments(cls: type, args: argparse.Namespace, **fixed: object):
    """`cls` built from the flags the command line set and the `fixed` values (fields the caller
    decides, such as one seed shared by several components); every other field keeps its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fixed) - names)
    if unknown:
        raise SettingsError(f"{cls.__name__} has no field {', '.join(unknown)}")
    values = {name: getattr(args, _dest(cls, name)) for name in flags(cls) if hasattr(args, _dest(cls, name))}
    return cls(**{**values, **fixed})
