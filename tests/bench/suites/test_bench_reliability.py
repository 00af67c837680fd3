"""The reliability suite joins its three parts (each tested against real processes in its own file)."""

import json
import types

from bench.__main__ import SUITES
from bench.suites import reliability


def _part(name: str, calls: list) -> types.SimpleNamespace:
    def run(quick, data_dir, work):
        calls.append(name)
        return {"summary": {f"{name}_figure": 1}, "quick": quick, "work": str(work)}

    return types.SimpleNamespace(run=run)


def test_the_suite_is_registered_and_joins_every_part_summary_once(tmp_path, monkeypatch):
    assert SUITES["reliability"] == reliability.__name__
    calls: list = []
    monkeypatch.setattr(reliability, "PARTS", {name: _part(name, calls) for name in ("faults", "fuzz", "load")})
    result = reliability.run(quick=True, work=tmp_path / "work")
    assert result["summary"] == {"faults_figure": 1, "fuzz_figure": 1, "load_figure": 1}
    assert result["fuzz"]["work"] == str(tmp_path / "work" / "fuzz")
    again = reliability.run(quick=True, work=tmp_path / "work")  # finished parts are kept, not run again
    assert calls == ["faults", "fuzz", "load"] and again["summary"] == result["summary"]
    reliability.run(quick=False, work=tmp_path / "work")  # another plan starts over
    assert calls == ["faults", "fuzz", "load"] * 2
    assert json.loads((tmp_path / "work" / "load.json").read_text())["quick"] is False
