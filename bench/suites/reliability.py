"""`prunefleet bench reliability`: faults, bad input, load and attacks against real processes, in one run.

Four parts, each its own module and each resumable on its own (a finished part is kept in the work
directory): `bench.faults.run` (kill -9 the cloud and an edge at the worst moments, restart the
coordinator under load, cut an edge off the network), `bench.fuzz.run` (hypothesis-generated messages to
every RPC, malformed variant files), `bench.load.fleet` (a thousand simulated edges reporting to one
coordinator, Predict at saturation, ten thousand switches with resident memory sampled) and
`bench.attacks.run` (the fleet's own members and certificate holders trying to do harm; run last, in
processes of its own, so the other parts' figures are what they were without it). The summary joins
the parts' summaries (of the parts run: `run(..., only=("attacks",))` runs one part alone, keeping the
others' finished results); docs/reliability.md states what each promise is and how it is tested.
"""

from __future__ import annotations

from pathlib import Path

from bench import workdir
from bench.attacks import run as attacks
from bench.faults import run as faults
from bench.fuzz import run as fuzz
from bench.load import fleet as fleet_load
from common.errors import PrunefleetError

PARTS = {"faults": faults, "fuzz": fuzz, "load": fleet_load, "attacks": attacks}


class UnknownPartError(PrunefleetError, ValueError):
    """`only` named a part the suite does not have."""


def run(quick: bool, data_dir=None, work: Path | None = None, only: tuple[str, ...] = ()) -> dict:
    """Every part in turn, or only those named in `only` (the others' finished results stay kept)."""
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        raise UnknownPartError(f"no part {', '.join(unknown)} in the reliability suite; parts: {', '.join(PARTS)}")
    work = Path(work or "runs/bench-reliability.work")
    workdir.fresh_if_changed(work, {"quick": quick, "parts": sorted(PARTS)})
    result = {}
    for name, part in PARTS.items():
        if only and name not in only:
            continue
        result[name] = workdir.cached(work, name, lambda part=part, name=name: part.run(quick, data_dir, work / name))
    result["summary"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    summary = {}
    for name in PARTS:
        if name in result:
            summary.update(result[name]["summary"])
    return summary
