"""Refills after a restart, on an in-memory log: every sensor's forecasts continue as if the daemon had never
stopped, whatever the fleet size, the producers' clocks or the readings' time formats."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import daemon_overrides, make_forecaster, sample_lines

from stream_forecaster.config import load_config
from stream_forecaster.metrics import Metrics
from stream_forecaster.pipeline import Pipeline
from stream_forecaster.recovery import MAX_EVICTIONS, Checkpoint, Recovery
from stream_forecaster.service import Daemon
from stream_forecaster.store import ModelStore
from stream_forecaster.testing import FakeRecord, ListSink, LogSource, MemoryTopic

L = 6
DAY_MS = 86_400_000


@pytest.fixture
def store(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L).save)
    return store


class Crash(BaseException):
    """The process dying where it stands (kill -9): nothing after it runs but ``finally`` blocks."""


class CrashingSource(LogSource):
    """Dies in its ``at``-th poll: the batch before is begun and in hand, not yet finished."""

    def __init__(self, topic: MemoryTopic, at: int, batch: int):
        super().__init__(topic, batch=batch)
        self.polls, self.at = 0, at

    def poll(self, timeout_s, max_records=None, before_revoke=None):
        self.polls += 1
        if self.polls == self.at:
            raise Crash()
        return super().poll(timeout_s, max_records, before_revoke)


def run_daemon(store, topic, *overrides, crash_at_poll: int | None = None) -> list[dict]:
    """One daemon over what the topic holds now, stopped cleanly at its end (or crashed in its ``crash_at_poll``-th
    poll); returns what it published."""
    config = load_config(None, daemon_overrides("127.0.0.1:9", {"input": topic.name, "output": "out", "group": "g"},
                                                store.path, metrics__port="0", **dict(overrides)), environ={})
    stop = threading.Event()
    sink = ListSink()
    source = LogSource(topic, stop_when_done=stop, batch=37) if crash_at_poll is None else \
        CrashingSource(topic, crash_at_poll, batch=37)
    daemon = Daemon(config, source=source, sink=sink, stop=stop, checkpoints=topic.checkpoints)
    if crash_at_poll is None:
        assert daemon.run() == 0
    else:
        assert daemon.initialize()
        with pytest.raises(Crash):
            daemon.loop()
        daemon.server.stop()  # and nothing else: a dead process's shutdown commits nothing
        daemon.runner.close()
    return [json.loads(r.value) for r in sink.records]


def fleet(sensors: int, minutes: int, clocks=None) -> list[tuple[int, bytes, bytes, int]]:
    """``(partition, key, value, Kafka timestamp)`` of a fleet sending the real sample minute by minute;
    ``clocks`` maps a sensor to its producer clock's offset in ms at each minute."""
    lines = {s: sample_lines(minutes, start=500 * s) for s in range(sensors)}
    out = []
    for minute in range(minutes):
        for s in range(sensors):
            skew = clocks(s, minute) if clocks else 0
            out.append((s % 2, f"sensor-{s}".encode(), lines[s][minute].encode(), 1_700_000_000_000 + skew))
    return out


def publish_in_runs(store, records, cuts, **overrides) -> list[dict]:
    """The records appended to a fresh topic in the stretches between ``cuts``, one daemon run each."""
    topic, published = MemoryTopic(partitions=2), []
    bounds = [0, *cuts, len(records)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for partition, key, value, ms in records[lo:hi]:
            topic.append(partition, key, value, ms)
        published += run_daemon(store, topic, *overrides.items())
    return published


def by_id(published: list[dict]) -> dict[str, float]:
    forecasts = {}
    for p in published:
        assert p["id"] not in forecasts, f"{p['id']} was published twice"
        forecasts[p["id"]] = p["prediction"]
    return forecasts


@pytest.mark.parametrize("clocks, snapshots", [(None, "0"), ("skewed", "5m")])
def test_restarts_change_no_forecast_for_a_fleet_larger_than_the_fallback_budget(store, clocks, snapshots):
    """30 sensors need 150 readings to refill; the budget for commits without a checkpoint is 20. Stopped and
    restarted four times, the daemon publishes exactly the forecasts of one uninterrupted run, whether it refills
    by replaying every window's readings or from a snapshot and the readings after it."""
    def skew(s, minute):
        # one producer's clock runs 3 days behind, another's jumps 2 days forward halfway: neither may matter
        return -3 * DAY_MS if s == 0 else (2 * DAY_MS if s == 1 and minute >= 20 else 0)
    records = fleet(30, 40, skew if clocks else None)
    uninterrupted = by_id(publish_in_runs(store, records, []))
    assert len(uninterrupted) == 30 * (40 - (L - 2))
    restarted = by_id(publish_in_runs(store, records, [200, 430, 431, 900], window__rebuild_messages="20",
                                      window__snapshot_interval=snapshots))
    assert restarted.keys() == uninterrupted.keys()
    # the same window in a batch of another size may differ in float32's last bit (batched matrix products)
    for ident, value in uninterrupted.items():
        assert restarted[ident] == pytest.approx(value, rel=1e-6), ident


@pytest.mark.parametrize("snapshots", ["0", "1ms"])
def test_a_crash_while_the_next_batch_is_in_hand_changes_no_forecast(store, snapshots):
    """The loop begins a batch before it commits the one before: the checkpoint committed, and the snapshot, are
    the windows as they stood at the committed offset, not with the readings in hand."""
    records = fleet(4, 60)  # 18 or so readings of a sensor a batch: the batch in hand fills its windows anew
    uninterrupted = by_id(publish_in_runs(store, records, []))
    topic = MemoryTopic(partitions=2)
    for partition, key, value, ms in records:
        topic.append(partition, key, value, ms)
    crashed = run_daemon(store, topic, ("window.snapshot_interval", snapshots), crash_at_poll=4)
    assert topic.commits == {0: 74}  # partition 0's first two batches; the third was begun, not finished
    restarted = by_id(crashed + run_daemon(store, topic, ("window.snapshot_interval", snapshots)))
    assert restarted.keys() == uninterrupted.keys()
    for ident, value in uninterrupted.items():
        assert restarted[ident] == pytest.approx(value, rel=1e-6), ident


def test_a_reading_without_a_time_keeps_its_sensors_repeat_check():
    """60 timed readings, one without a time, then the same 60 again: the repeats are stale, not forecast again."""
    forecaster = make_forecaster(sequence_length=L)
    config = load_config(None, ["model.sequence_length=6", "data.features=[Global_active_power]",
                                "model.layers=[1, 8, 1]"], environ={})
    sink, metrics = ListSink(), Metrics(forecaster.targets)
    pipeline = Pipeline(config, forecaster, sink, metrics)
    timed = [line.encode() for line in sample_lines(60)]
    untimed = json.dumps({"values": {"Global_active_power": 1.5}}).encode()
    values = timed + [untimed] + timed
    pipeline.process([FakeRecord("in", 0, i, b"s", v) for i, v in enumerate(values)])
    ids = [dict(r.headers)["prediction_id"] for r in sink.records]
    assert len(ids) == len(set(ids)) == 60 - (L - 2) + 1  # the untimed reading is forecast too, once
    assert metrics.registry.get_sample_value("stream_forecaster_readings_total", {"outcome": "stale"}) == 60


def latest(topic: MemoryTopic) -> Checkpoint:
    """The checkpoint of partition 0's committed offset."""
    return Checkpoint.decode(topic.checkpoints.read(0), topic.commits[0])


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Live:
    """A pipeline and its recovery on an in-memory topic, under a clock the test moves; ``batch`` handles records as
    the daemon's loop does, eviction included."""

    def __init__(self):
        self.config = load_config(None, ["model.sequence_length=6", "data.features=[Global_active_power]",
                                         "model.layers=[1, 8, 1]", "window.idle_ttl=1h"], environ={})
        self.forecaster = make_forecaster(sequence_length=L)
        self.topic, self.clock = MemoryTopic(), Clock()
        metrics = Metrics(self.forecaster.targets)
        self.pipeline = Pipeline(self.config, self.forecaster, ListSink(), metrics)
        self.recovery = Recovery(self.config, LogSource(self.topic), self.pipeline, metrics, threading.Event(),
                                 self.topic.checkpoints, self.clock)
        self.recovery.take_changes()
        self.recovery.refill()

    def batch(self, records) -> int:
        """Handle ``records``, commit, evict; returns how many sensors were evicted."""
        self.pipeline.process(records)
        self.recovery.processed({("in", 0): records[-1].offset + 1})
        self.recovery.commit()
        return self.recovery.evict()

    def refilled(self, start: int, snapshot: dict | None = None) -> Pipeline:
        """A new pipeline refilled from ``start`` to the committed offset, from ``snapshot`` if given."""
        checkpoint = latest(self.topic)
        refilled = Pipeline(self.config, self.forecaster, ListSink(), Metrics(self.forecaster.targets))
        if snapshot is not None:
            refilled.restore(0, self.topic.checkpoints.read_snapshot(0, snapshot))
        refilled.refill(0, iter(self.topic.logs[0][start:checkpoint.committed]), checkpoint.evictions)
        return refilled


def test_eviction_follows_the_daemons_clock_and_travels_in_the_checkpoints():
    """Two sensors; one goes quiet for longer than the idle ttl by the daemon's clock (its producer's clock says
    nothing about that). It is evicted, the checkpoint says so, and a refill evicts it at the same place."""
    live, lines = Live(), [line.encode() for line in sample_lines(40)]
    live.batch([live.topic.append(0, key, lines[i]) for i in range(L) for key in (b"quiet", b"busy")])
    for minute in range(1, 62):
        live.clock.now += 60
        evicted = live.batch([live.topic.append(0, b"busy", lines[L + minute % 30])])
        assert evicted == (1 if minute == 60 else 0)  # once an hour has passed, not before
    assert set(live.pipeline.windows.slots) == {"busy"}
    checkpoint = latest(live.topic)
    assert checkpoint.refill_from > 2 * L  # no need to go back to quiet's readings
    # but the latest snapshot, written at the same offset just before the eviction, still holds them: a refill
    # from it must replay the eviction
    assert checkpoint.snapshot["at"] == 2 * L + 60 and checkpoint.evictions == ((2 * L + 60, 2 * L),)
    # "quiet" speaks again and fills a new window: a refill now must not mix in its readings of an hour ago
    live.batch([live.topic.append(0, b"quiet", lines[30 + i]) for i in range(L - 1)])
    checkpoint = latest(live.topic)
    for refilled in (live.refilled(checkpoint.refill_from), live.refilled(checkpoint.snapshot["at"],
                                                                           checkpoint.snapshot)):
        assert set(refilled.windows.slots) == {"quiet", "busy"}
        for sensor in ("quiet", "busy"):
            np.testing.assert_array_equal(refilled.windows.window(refilled.windows.slots[sensor]),
                                          live.pipeline.windows.window(live.pipeline.windows.slots[sensor]))


def test_a_sensor_whose_window_spans_the_ttl_holds_the_refill_back_and_the_evictions_are_carried():
    """A slow sensor keeps the refill start before a quiet one's readings: the quiet one's eviction must then be
    in the checkpoint, or a refill would give it back its old readings."""
    live, lines = Live(), [line.encode() for line in sample_lines(40)]
    live.batch([live.topic.append(0, b"slow", lines[0]), live.topic.append(0, b"quiet", lines[0])])
    for step in range(1, 4):  # "slow" reads every 50 minutes, "quiet" not at all: evicted after an hour
        live.clock.now += 50 * 60
        live.batch([live.topic.append(0, b"slow", lines[step])])
    live.batch([live.topic.append(0, b"quiet", lines[10 + i]) for i in range(L - 2)])
    checkpoint = latest(live.topic)
    assert checkpoint.refill_from == 0 and len(checkpoint.evictions) == 1  # "slow" still holds its first reading
    refilled = live.refilled(0)
    quiet = refilled.windows.slots["quiet"]
    assert refilled.windows.full(np.array([quiet])).tolist() == [False]  # its new readings only, not its old one
    assert refilled.windows.refill_starts() == live.pipeline.windows.refill_starts()


def test_a_checkpoint_names_its_commit_and_the_one_before_and_nothing_else_is_taken_for_one():
    previous = Checkpoint(100, 40, ((90, 50),))
    latest_written = Checkpoint(130, 60, ((90, 50), (120, 70)))
    text = latest_written.encode(previous)
    assert Checkpoint.decode(text, 130) == latest_written
    assert Checkpoint.decode(text, 100) == previous  # written, then the commit failed or the daemon died
    assert Checkpoint.decode(text, 115) is None  # neither: the fallback decides
    many = Checkpoint(10**12, 0, tuple((i + 1, i) for i in range(3 * MAX_EVICTIONS)))
    assert Checkpoint.decode(many.encode(None), 10**12).evictions == many.evictions[-MAX_EVICTIONS:]
    for foreign in ("", "checkpoint-7", "[]", '{"committed": 130}', '{"committed": 130, "refill_from": -1}',
                    '{"committed": 130, "refill_from": true}', '{"committed": 130, "refill_from": 131}'):
        assert Checkpoint.decode(foreign, 130) is None


class WatchedSource(LogSource):
    """Asks the daemon whether it is ready at the moments a probe could: just after the assigning poll, and while
    the refill reads."""

    def __init__(self, topic, stop):
        super().__init__(topic, stop_when_done=stop)
        self.daemon, self.answers = None, []

    def take_changes(self):
        self.answers.append(("assigned", self.daemon.ready()))
        return super().take_changes()

    def read_range(self, partition, start, end, stop):
        self.answers.append(("refilling", self.daemon.ready()))
        yield from super().read_range(partition, start, end, stop)


def test_not_ready_from_the_assignment_until_the_refill_is_done(store):
    topic = MemoryTopic()
    lines = [line.encode() for line in sample_lines(2 * L)]
    for line in lines[:L]:
        topic.append(0, b"s", line)
    run_daemon(store, topic, ("window__snapshot_interval", "0"))  # commits offset L, its refill starting at 1
    for line in lines[L:]:
        topic.append(0, b"s", line)
    config = load_config(None, daemon_overrides("127.0.0.1:9", {"input": "in", "output": "out", "group": "g"},
                                                store.path, metrics__port="0", window__snapshot_interval="0"),
                         environ={})
    stop = threading.Event()
    source = WatchedSource(topic, stop)
    daemon = Daemon(config, source=source, sink=ListSink(), stop=stop, checkpoints=topic.checkpoints)
    source.daemon = daemon
    assert daemon.run() == 0
    assert source.answers[:2] == [("assigned", False), ("refilling", False)]
    assert ("assigned", True) in source.answers[2:]  # ready once refilled
