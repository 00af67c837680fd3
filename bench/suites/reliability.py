"""`prunefleet bench reliability`: faults, bad input and load against real processes, in one run.

Three parts, each its own module and each resumable on its own (a finished part is kept in the work
directory): `bench.faults.run` (kill -9 the cloud and an edge at the worst moments, restart the
coordinator under load, cut an edge off the network), `bench.fuzz.run` (hypothesis-generated messages to
every RPC, malformed variant files) and `bench.load.fleet` (a thousand simulated edges reporting to one
coordinator, Predict at saturation, ten thousand switches with resident memory sampled). The summary
joins the parts' summaries; docs/reliability.md states what each promise is and how it is tested.
"""

from __future__ import annotations

from pathlib import Path

from bench import workdir
from bench.faults import run as faults
from bench.fuzz import run as fuzz
from bench.load import fleet as fleet_load

PARTS = {"faults": faults, "fuzz": fuzz, "load": fleet_load}


def run(quick: bool, data_dir=None, work: Path | None = None) -> dict:
    work = Path(work or "runs/bench-reliability.work")
    workdir.fresh_if_changed(work, {"quick": quick, "parts": sorted(PARTS)})
    result = {}
    for name, part in PARTS.items():
        result[name] = workdir.cached(work, name, lambda part=part, name=name: part.run(quick, data_dir, work / name))
    result["summary"] = summarize(result)
    return result


def summarize(result: dict) -> dict:
    summary = {}
    for name in PARTS:
        summary.update(result[name]["summary"])
    return summary
