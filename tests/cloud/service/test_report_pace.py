"""Per-identity report pacing: a burst at once, then the stated rate, each identity on its own."""

import pytest

from cloud.service.report_pace import IDLE_S, PaceConfig, ReportPace


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_burst_passes_then_reports_wait_their_turn_at_the_rate():
    clock, paced = Clock(), []
    pace = ReportPace(PaceConfig(rate=10.0, burst=3), clock, on_paced=lambda: paced.append(1))
    assert [pace.delay("edge-a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pace.delay("edge-a") == pytest.approx(0.1)  # the fourth waits one token's time
    assert pace.delay("edge-a") == pytest.approx(0.2)  # and the one behind it its own turn after it
    assert len(paced) == 2  # the reports that had to wait
    clock.now += 0.2  # the reader slept its 0.2 s: both debts are paid
    assert pace.delay("edge-a") == pytest.approx(0.1)
    clock.now += 10.0  # refilled, but never beyond the burst
    assert [pace.delay("edge-a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pace.delay("edge-a") > 0


def test_each_identity_has_its_own_bucket():
    pace = ReportPace(PaceConfig(rate=1.0, burst=1), Clock())
    assert pace.delay("edge-a") == 0.0
    assert pace.delay("edge-a") == pytest.approx(1.0)
    assert pace.delay("edge-b") == 0.0  # a flooding edge never slows another


def test_idle_identities_are_forgotten():
    clock = Clock()
    pace = ReportPace(PaceConfig(rate=1.0, burst=1), clock)
    pace.delay("edge-a")
    clock.now += IDLE_S / 2
    pace.delay("edge-b")
    clock.now += IDLE_S / 2 + 1
    pace.delay("edge-b")
    assert len(pace) == 1


@pytest.mark.parametrize("config", [{"rate": 0.0}, {"rate": -1.0}, {"burst": 0}, {"rate": float("nan")}])
def test_a_pace_that_never_lets_a_report_through_is_refused(config):
    with pytest.raises(ValueError, match="positive rate"):
        PaceConfig(**config)
