"""Durations as operators write them: `90`, `90s`, `15m`, `12h`, `7d` (a number of seconds without a unit).

Used by the flags that take a lifetime or a time to live (`prunefleet cloud serve --cert-lifetime`,
`prunefleet certs token --ttl`); a value that does not parse raises ValueError naming the setting.
"""

from __future__ import annotations

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, setting: str = "duration") -> float:
    """Seconds in `text`; ValueError naming `setting` when it is not a positive number with an optional unit."""
    text = text.strip().lower()
    scale = UNITS.get(text[-1:], None)
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{setting} must be a positive number with an optional unit s, m, h or d, got {text[:40]!r}")
    return seconds
