"""Attack records without processes: a finding is refused only when every part of it was, an attack
that cannot be carried out is recorded as not refused, and malformed records are named."""

import pytest

from bench.attacks import records


def _attack(carry_out, pending=""):
    return records.Attack("probe", "something", "a refusal", carry_out, pending)


def test_a_finding_is_refused_only_when_every_part_is():
    found = records.Refusals()
    found.check("first", True, "PERMISSION_DENIED")
    assert found.finding().refused
    found.check("second", False, "OK")
    finding = found.finding()
    assert not finding.refused and "second: OK (NOT REFUSED)" in finding.happened
    assert not records.Refusals().finding().refused  # nothing tried is nothing refused


def test_an_attack_that_cannot_be_carried_out_is_recorded_as_not_refused():
    def broken(arena):
        raise RuntimeError("no cloud")

    record = records.attempt(_attack(broken), arena=None)
    assert records.problems(record) == []
    assert not record["refused"] and "RuntimeError: no cloud" in record["happened"]


def test_records_are_checked_and_summed():
    record = records.attempt(_attack(lambda arena: records.Finding(True, "PERMISSION_DENIED")), arena=None)
    assert records.problems(record) == [] and record["refused"]
    assert records.problems({**record, "refused": "yes"}) == ["refused must be true or false"]
    assert records.problems({k: v for k, v in record.items() if k != "seconds"}) == ["no seconds"]
    assert records.summarize([record, {**record, "refused": False}]) == {"attacks_tried": 2, "attacks_refused": 1}
    with pytest.raises(ValueError, match="needs a name"):
        records.Attack("", "x", "y", lambda arena: None)


def test_the_part_alone_refuses_an_unknown_attack_before_starting_anything(tmp_path, capsys):
    from bench.attacks import run

    with pytest.raises(SystemExit) as stopped:
        run.main(["--json", str(tmp_path / "a.json"), "--only", "impersonation,sabotage"])
    assert stopped.value.code == 2 and "no attack sabotage" in capsys.readouterr().err
    assert not (tmp_path / "a.work").exists()
    assert all(records.problems(_record_of(a)) == [] for a in run.ATTACKS.values())  # every text is there


def _record_of(attack: records.Attack) -> dict:
    return {
        "name": attack.name,
        "tried": attack.tried,
        "expected": attack.expected,
        "happened": "not run",
        "refused": False,
        "seconds": 0.0,
        "pending": attack.pending,
        "measured": {},
    }
