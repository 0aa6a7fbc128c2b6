"""When the retrainer starts a cycle: on schedule, and when the fleet's live skill stays low (a manual clock)."""

from __future__ import annotations

import math

import pytest

from stream_forecaster.config import ConfigError, load_config
from stream_forecaster.retrain import Outcome, Retrainer, SkillTrigger
from stream_forecaster.testing import ManualClock

DRIFT_AT = 2 * 3600.0


def test_the_skill_must_stay_low_for_the_hold_and_cycles_keep_their_distance():
    clock = ManualClock()
    trigger = SkillTrigger(0.0, hold_s=600, min_interval_s=3600, clock=clock)
    assert not trigger.observe(-0.5)  # low, but not for long yet
    clock.advance(300)
    assert not trigger.observe(0.2)  # back up: the hold starts over
    for _ in range(10):
        clock.advance(60)
        assert not trigger.observe(-0.5)
    clock.advance(60)
    assert trigger.observe(-0.5)  # 600 s low on every look
    trigger.cycle_started()
    for _ in range(59):
        clock.advance(60)
        assert not trigger.observe(-0.5)  # low for longer than the hold, but within min_interval
    clock.advance(60)
    assert trigger.observe(-0.5)
    trigger.cycle_started()
    clock.advance(7200)
    assert not trigger.observe(math.nan)  # unknown (no health records) is not low
    assert not trigger.observe(-0.5)


class Cycles(Retrainer):
    """A retrainer whose cycles only note when they started, on a manual clock that ends at ``until``."""

    def __init__(self, config, skill, until):
        self.manual = ManualClock()
        super().__init__(config, clock=self.manual, wait=self._wait, fleet_skill=lambda: (skill(self.manual()), 100))
        self.until, self.started = until, []

    def _wait(self, seconds):
        self.manual.advance(seconds)
        if self.manual() >= self.until:
            self.stop.set()
        return self.stop.is_set()

    def run_once(self):
        self.started.append(self.manual())
        return Outcome("rejected", "not trained here")


def retrainer(tmp_path, skill, until, *overrides):
    config = load_config(None, [f"model_store.path={tmp_path / 'models'}", "retrain.metrics_port=0",
                                "kafka.health_topic=health", "retrain.every=6h", "retrain.trigger_skill=0",
                                "retrain.trigger_for=30m", "retrain.min_interval=1h", "metrics.health_interval=1m",
                                *overrides], environ={})
    return Cycles(config, skill, until)


def starts(r, reason):
    return r.metrics.registry.get_sample_value("stream_forecaster_retrain_starts_total", {"reason": reason})


def test_a_drift_starts_one_cycle_after_the_hold_and_no_more_within_min_interval(tmp_path):
    r = retrainer(tmp_path, lambda now: 0.15 if now < DRIFT_AT else -0.3, DRIFT_AT + 3 * 3600)
    assert r.run() == 0
    # on schedule at once; the skill is below from DRIFT_AT, read every minute: a cycle 30 minutes later, then
    # while it stays below one per min_interval, and the schedule moves on from the last cycle
    hold, rest = 1800, 3600
    assert r.started == [0.0, DRIFT_AT + hold, DRIFT_AT + hold + rest, DRIFT_AT + hold + 2 * rest]
    assert starts(r, "schedule") == 1 and starts(r, "skill") == 3
    assert r.metrics.registry.get_sample_value("stream_forecaster_retrain_fleet_skill") == -0.3


def test_a_model_that_recovers_after_one_cycle_is_left_to_the_schedule(tmp_path):
    recovered_at = DRIFT_AT + 1800 + 600  # the cycle's new model serves and the skill comes back
    r = retrainer(tmp_path, lambda now: -0.3 if DRIFT_AT <= now < recovered_at else 0.15, 13 * 3600)
    assert r.run() == 0
    assert r.started == [0.0, DRIFT_AT + 1800, DRIFT_AT + 1800 + 6 * 3600]
    assert starts(r, "schedule") == 2 and starts(r, "skill") == 1


def test_without_a_trigger_the_skill_is_never_read(tmp_path):
    r = retrainer(tmp_path, lambda now: pytest.fail("the skill was read"), 12 * 3600 + 1, "retrain.trigger_skill=null")
    assert r.run() == 0
    assert r.started == [0.0, 6 * 3600.0, 12 * 3600.0]
    assert starts(r, "schedule") == 3 and starts(r, "skill") == 0


def test_the_trigger_needs_the_health_topic(tmp_path):
    with pytest.raises(ConfigError, match="retrain.trigger_skill: .*kafka.health_topic"):
        load_config(None, ["retrain.trigger_skill=0"], environ={})
