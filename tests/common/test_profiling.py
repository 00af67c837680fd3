"""Latency measured interleaved: medians within their quartiles, ties seen as ties, rounds that alternate
the order, and the CPU's name for titles and metadata."""

import copy
import platform

import pytest
import torch
from torch import nn

from common.errors import PrunefleetError
from common.profiling import (
    MIN_ROUNDS,
    LatencySpread,
    ProfilingError,
    cpu_model,
    measure_interleaved,
    measure_latency,
)

SHAPE = (1, 28, 28)


def _small_cnn(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.Flatten()
    )


class Recorder(nn.Module):
    """A model that writes its name in a shared log on every forward pass."""

    def __init__(self, name: str, log: list[str]):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_every_model_gets_a_p50_within_its_quartiles():
    spreads = measure_interleaved({"small": _small_cnn(2), "large": _small_cnn(64)}, SHAPE, batch=8, iters=3)
    for spread in spreads.values():
        assert spread.q1_ms <= spread.p50_ms <= spread.q3_ms
        assert spread.q1_ms > 0 and spread.batch == 8 and spread.rounds >= MIN_ROUNDS
    assert spreads["small"].p50_ms < spreads["large"].p50_ms  # about 1000 times the multiply-adds


def test_identical_models_are_not_ranked_by_noise():
    model = _small_cnn(16)
    spreads = measure_interleaved({"a": model, "b": copy.deepcopy(model)}, SHAPE, batch=8, iters=3)
    assert spreads["a"].overlaps(spreads["b"]) and spreads["b"].overlaps(spreads["a"])


def test_rounds_time_each_model_for_iters_runs_in_alternating_order():
    log: list[str] = []
    models = {name: Recorder(name, log) for name in ("a", "b", "c")}
    measure_interleaved(models, SHAPE, batch=1, iters=2, rounds=4, warmup=1)
    warmup, timed = log[:3], log[3:]
    assert warmup == ["a", "b", "c"]
    forward, backward = ["a", "a", "b", "b", "c", "c"], ["c", "c", "b", "b", "a", "a"]
    assert timed == forward + backward + forward + backward


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iters": 0},
        {"batch": 0},
        {"warmup": -1},
        {"rounds": MIN_ROUNDS - 1},
    ],
)
def test_settings_that_cannot_give_quartiles_are_refused(kwargs):
    settings = {"batch": 1, **kwargs}
    with pytest.raises(ProfilingError):
        measure_interleaved({"m": nn.Identity()}, SHAPE, **settings)


def test_no_models_is_refused_and_the_error_is_a_project_value_error():
    with pytest.raises(ProfilingError) as caught:
        measure_interleaved({}, SHAPE, batch=1)
    assert isinstance(caught.value, PrunefleetError) and isinstance(caught.value, ValueError)
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), SHAPE, batch=0)


def test_a_spread_holds_its_median_and_knows_when_two_overlap():
    with pytest.raises(ProfilingError):
        LatencySpread(batch=1, p50_ms=3.0, q1_ms=1.0, q3_ms=2.0, rounds=5)
    low, high = LatencySpread(1, 1.5, 1.0, 2.0, 5), LatencySpread(1, 3.0, 2.5, 3.5, 5)
    assert not low.overlaps(high) and not high.overlaps(low)
    touching = LatencySpread(1, 2.2, 2.0, 2.6, 5)
    assert low.overlaps(touching) and touching.overlaps(high)


def test_cpu_model_reads_the_model_name_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU 9000 @ 3.00GHz\n")
    assert cpu_model(cpuinfo) == "Example CPU 9000 @ 3.00GHz"


def test_cpu_model_falls_back_to_the_platform_without_a_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t:\nHardware\t: board\n")  # an empty name counts as none
    platform_name = platform.processor() or platform.machine() or "unknown CPU"
    assert cpu_model(cpuinfo) == platform_name and cpu_model(tmp_path / "absent") == platform_name
    assert cpu_model().strip()  # this machine's, whatever it is
