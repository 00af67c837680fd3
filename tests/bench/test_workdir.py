"""A suite's work directory: kept for the same plan, started over for another."""

import json

from bench import workdir


def _kept(work, plan: dict) -> bool:
    workdir.fresh_if_changed(work, plan)
    return (work / "done.json").exists()


def test_the_same_plan_keeps_its_work_and_another_starts_over(tmp_path):
    work = tmp_path / "work"
    workdir.fresh_if_changed(work, {"subset": 100})
    (work / "done.json").write_text("{}")
    assert _kept(work, {"subset": 100})
    assert not _kept(work, {"subset": 200})
    assert json.loads((work / "plan.json").read_text()) == {"subset": 200}


def test_a_plan_kept_before_test_subset_existed_is_the_same_plan_at_zero(tmp_path):
    work = tmp_path / "work"
    workdir.fresh_if_changed(work, {"subset": 100})  # as an older version wrote it
    (work / "done.json").write_text("{}")
    assert _kept(work, {"subset": 100, "test_subset": 0})  # the whole test split, as before
    assert _kept(work, {"subset": 100})
    assert not _kept(work, {"subset": 100, "test_subset": 500})
