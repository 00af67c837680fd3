"""A suite's work directory: checkpoints and finished points that a rerun of the same plan resumes from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from cloud.build.data import TEST_SUBSET_SEED
from cloud.build.portfolio import SETTINGS_ADDED
from common import datasets
from common.files import atomic_write_json

# Plan keys added after work directories were kept, each at what a plan without it did: a work
# directory of such a plan is the same plan's. Every one so far is a build setting a plan passes on
# as it is, added to the builds at the same time and at the same value.
ADDED = SETTINGS_ADDED


def fresh_if_changed(work: Path, plan: dict) -> None:
    """Keep `work` for a rerun of the same plan; any other plan starts over."""
    marker = work / "plan.json"
    if marker.exists() and {**ADDED, **json.loads(marker.read_text())} != {**ADDED, **plan}:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, plan)


def cached(work: Path, key: str, compute: Callable[[], dict]) -> dict:
    """A finished point, kept as JSON in `work`: an interrupted run resumes after it."""
    path = work / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def start(plan: dict, work: Path | None, default: str, data_dir: Path | None) -> tuple[Path, datasets.Dataset]:
    """The suite's work directory (kept for the same plan) and Fashion-MNIST cut to the plan's subset
    (and its test split to the plan's `test_subset`, if it has one, as a build's `--test-subset` cuts it)."""
    work = Path(work or default)
    fresh_if_changed(work, plan)
    data = datasets.load("fashion-mnist", data_dir)
    test = data.test.subset(plan.get("test_subset", 0), TEST_SUBSET_SEED)
    return work, datasets.Dataset(data.info, data.train.subset(plan["subset"], 0), data.val, test)
