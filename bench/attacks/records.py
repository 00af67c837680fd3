"""One attack and what it left behind: the record every attack of the adversarial part writes.

An attack is a function of the arena (`bench.attacks.arena.Arena`) returning a `Finding`: whether the
system refused it and what happened, in words and in measured figures. `attempt` runs one, times it and
turns an attack that could not even be carried out (its set-up failed) into a record that says so and
counts as not refused: an attack is refused only when it was tried and every part of it was refused.
`pending` names the work an attack's refusal depends on that is not built yet; such an attack may be
recorded as not refused, never the reverse (the tests hold every other attack to being refused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """What one attack did: `refused` when every part of it was refused; `happened` says what each
    part got back; `measured` holds its figures (seconds to a refusal, edges written, ...)."""

    refused: bool
    happened: str
    measured: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """An attack: its name, what it tries, what should happen, the function that carries it out, and
    the work not built yet that its refusal depends on ("" when it depends on none)."""

    name: str
    tried: str
    expected: str
    carry_out: Callable[..., Finding]
    pending: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.tried or not self.expected:
            raise ValueError("an attack needs a name, what it tries and what should happen")


class Refusals:
    """The parts of one attack, each refused or not, put together as one finding."""

    def __init__(self):
        self.parts: list[tuple[str, bool, str]] = []
        self.measured: dict = {}

    def check(self, part: str, refused: bool, seen: str) -> bool:
        self.parts.append((part, bool(refused), seen))
        return bool(refused)

    def finding(self) -> Finding:
        happened = "; ".join(f"{part}: {seen}{'' if ok else ' (NOT REFUSED)'}" for part, ok, seen in self.parts)
        return Finding(bool(self.parts) and all(ok for _, ok, _ in self.parts), happened, self.measured)


def attempt(attack: Attack, arena) -> dict:
    """Carry out `attack` against the arena and return its record."""
    log.info("attack %s", attack.name)
    started = time.monotonic()
    try:
        finding = attack.carry_out(arena)
    except Exception as err:  # an attack that could not be carried out is recorded, never refused
        log.exception("attack %s could not be carried out", attack.name)
        finding = Finding(False, f"could not be carried out: {type(err).__name__}: {str(err)[:500]}")
    record = {
        "name": attack.name,
        "tried": attack.tried,
        "expected": attack.expected,
        "happened": finding.happened,
        "refused": finding.refused,
        "seconds": round(time.monotonic() - started, 3),
        "pending": attack.pending,
        "measured": finding.measured,
    }
    log.info("attack %s: refused %s (%.1f s)", attack.name, record["refused"], record["seconds"])
    return record


RECORD_KEYS = ("name", "tried", "expected", "happened", "refused", "seconds", "pending", "measured")


def problems(record: dict) -> list[str]:
    """Why a record is not well-formed ([] when it is)."""
    found = [f"no {key}" for key in RECORD_KEYS if key not in record]
    if found:
        return found
    if not all(isinstance(record[k], str) and record[k] for k in ("name", "tried", "expected", "happened")):
        found.append("name, tried, expected and happened must be non-empty text")
    if not isinstance(record["refused"], bool):
        found.append("refused must be true or false")
    if not isinstance(record["seconds"], int | float) or record["seconds"] < 0:
        found.append("seconds must be a non-negative number")
    if not isinstance(record["measured"], dict) or not isinstance(record["pending"], str):
        found.append("measured must be a mapping and pending text")
    return found


def summarize(records: list[dict]) -> dict:
    return {
        "attacks_tried": len(records),
        "attacks_refused": sum(r["refused"] for r in records),
    }
