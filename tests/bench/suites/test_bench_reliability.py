"""The reliability suite joins its four parts (each tested against real processes in its own file)."""

import json
import types

import pytest

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
    parts = ("faults", "fuzz", "load", "attacks")
    monkeypatch.setattr(reliability, "PARTS", {name: _part(name, calls) for name in parts})
    result = reliability.run(quick=True, work=tmp_path / "work")
    assert result["summary"] == {"faults_figure": 1, "fuzz_figure": 1, "load_figure": 1, "attacks_figure": 1}
    assert result["fuzz"]["work"] == str(tmp_path / "work" / "fuzz")
    again = reliability.run(quick=True, work=tmp_path / "work")  # finished parts are kept, not run again
    assert calls == list(parts) and again["summary"] == result["summary"]
    reliability.run(quick=False, work=tmp_path / "work")  # another plan starts over
    assert calls == list(parts) * 2
    assert json.loads((tmp_path / "work" / "load.json").read_text())["quick"] is False


def test_the_attacks_run_last_and_add_their_keys_beside_the_other_parts():
    """The other parts run first, in processes of their own, so their figures are what they were."""
    assert list(reliability.PARTS) == ["faults", "fuzz", "load", "attacks"]
    assert reliability.PARTS["attacks"].__name__ == "bench.attacks.run"
    record = {"summary": {"attacks_tried": 14, "attacks_refused": 12}}
    joined = reliability.summarize(
        {
            "faults": {"summary": {"faults_total": 6}},
            "fuzz": {"summary": {}},
            "load": {"summary": {}},
            "attacks": record,
        }
    )
    assert joined == {"faults_total": 6, "attacks_tried": 14, "attacks_refused": 12}


def test_one_part_runs_alone_and_the_others_finished_results_stay(tmp_path, monkeypatch):
    calls: list = []
    parts = ("faults", "fuzz", "load", "attacks")
    monkeypatch.setattr(reliability, "PARTS", {name: _part(name, calls) for name in parts})
    reliability.run(quick=True, work=tmp_path / "work")
    alone = reliability.run(quick=True, work=tmp_path / "work", only=("attacks",))
    assert calls == list(parts) and alone["summary"] == {"attacks_figure": 1} and "faults" not in alone
    (tmp_path / "work" / "attacks.json").unlink()  # as if the attacks changed: only they run again
    reliability.run(quick=True, work=tmp_path / "work", only=("attacks",))
    assert calls == [*parts, "attacks"]
    with pytest.raises(ValueError, match="no part sabotage"):
        reliability.run(quick=True, work=tmp_path / "work", only=("sabotage",))
