"""The daemon on the fakes of stream_forecaster.testing: a configuration tested without a broker or TensorFlow."""

from __future__ import annotations

import json
import threading

import numpy as np

from stream_forecaster.config import load_config
from stream_forecaster.service import Daemon
from stream_forecaster.testing import ListSink, LogSource, ManualClock, MemoryTopic, StubForecaster

L = 5  # window length: 4 readings in, the next out
SENSORS = ("meter-a", "meter-b", "meter-c")


def config(tmp_path):
    return load_config(None, ["data.features=[power]", "data.targets=[power]", f"model.sequence_length={L}",
                              "metrics.port=0", f"model_store.path={tmp_path / 'models'}",
                              "window.snapshot_interval=0"], environ={})


def reading(sensor: int, minute: int) -> float:
    """A different size for each sensor, as in a fleet."""
    return (10.0 ** sensor) * (1.0 + 0.1 * np.sin(minute))


def append(topic: MemoryTopic, minutes: range) -> None:
    for minute in minutes:
        for s, sensor in enumerate(SENSORS):
            value = json.dumps({"timestamp": f"2026-01-01T{minute // 60:02d}:{minute % 60:02d}:00",
                                "values": {"power": reading(s, minute)}})
            topic.append(s % 2, sensor.encode(), value.encode())


def run(tmp_path, topic: MemoryTopic, forecaster: StubForecaster) -> tuple[Daemon, ListSink, ManualClock]:
    stop, sink = threading.Event(), ListSink()
    clock = ManualClock(stop=stop)
    daemon = Daemon(config(tmp_path), source=LogSource(topic, stop_when_done=stop), sink=sink, stop=stop,
                    clock=clock, wait=clock.wait, checkpoints=topic.checkpoints, forecaster=forecaster)
    assert daemon.run() == 0
    return daemon, sink, clock


def test_every_full_window_is_forecast_published_scored_and_committed(tmp_path):
    topic = MemoryTopic("readings", partitions=2)
    append(topic, range(20))
    forecaster = StubForecaster(["power"], ["power"], L, version="7")  # persistence: the last reading
    daemon, sink, _ = run(tmp_path, topic, forecaster)

    published = [json.loads(r.value) for r in sink.records]
    assert len(published) == len(SENSORS) * (20 - (L - 1) + 1) == forecaster.windows_seen  # from the 4th reading on
    for p in published:
        s = SENSORS.index(p["sensor"])
        minute = int(p["timestamp"][14:16]) + 60 * int(p["timestamp"][11:13])  # the forecast is for a minute on
        assert p["prediction"] == np.float32(reading(s, minute - 1)) and p["model_version"] == "7"
        assert p["id"] == f"{p['sensor']}@{p['timestamp']}"
    assert topic.commits == {0: len(topic.logs[0]), 1: len(topic.logs[1])}  # everything published was committed
    value = daemon.metrics.registry.get_sample_value
    assert value("stream_forecaster_readings_total", {"outcome": "accepted"}) == 20 * len(SENSORS)
    # the stub is persistence itself: the model's live error is persistence's
    model = value("stream_forecaster_rolling_mae", {"target": "power", "forecaster": "model"})
    baseline = value("stream_forecaster_rolling_mae", {"target": "power", "forecaster": "persistence"})
    assert model > 0 and model == baseline


def test_a_restarted_daemon_refills_its_windows_and_forecasts_the_next_reading_at_once(tmp_path):
    topic = MemoryTopic("readings", partitions=2)
    append(topic, range(10))
    run(tmp_path, topic, StubForecaster(["power"], ["power"], L))
    append(topic, range(10, 11))  # one new reading per sensor: only refilled windows can forecast it
    daemon, sink, _ = run(tmp_path, topic, StubForecaster(["power"], ["power"], L))
    assert sorted(json.loads(r.value)["sensor"] for r in sink.records) == sorted(SENSORS)
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_rebuilt_readings_total") > 0


class RevokedAtPoll(LogSource):
    """Revokes partition 0 in its ``at``-th poll, when the batch before is still in hand."""

    def __init__(self, topic: MemoryTopic, stop: threading.Event, at: int):
        super().__init__(topic, stop_when_done=stop)
        self.polls, self.at, self.handed_out = 0, at, 0

    def poll(self, timeout_s, max_records=None, before_revoke=None):
        self.polls += 1
        if self.polls == self.at:
            self.handed_out = self.positions[0]
            self.revoke({0})
        return super().poll(timeout_s, max_records, before_revoke)


def test_a_batch_in_hand_is_published_and_committed_before_its_partition_is_revoked(tmp_path):
    topic = MemoryTopic("readings", partitions=2)
    append(topic, range(150))  # partition 0: meter-a and meter-c, 300 readings, handed out 100 a poll
    stop, sink = threading.Event(), ListSink()
    source = RevokedAtPoll(topic, stop, at=3)
    daemon = Daemon(config(tmp_path), source=source, sink=sink, stop=stop, checkpoints=topic.checkpoints,
                    forecaster=StubForecaster(["power"], ["power"], L))
    assert daemon.run() == 0
    assert source.handed_out == 200
    assert topic.commits[0] == 200  # the commit came before the revocation: the group refuses one after it
    from_partition_0 = [json.loads(r.value)["sensor"] for r in sink.records if r.key in (b"meter-a", b"meter-c")]
    assert len(from_partition_0) == 2 * (100 - (L - 1) + 1)  # each sensor's 100 readings: every full window, once
    assert topic.commits[1] == len(topic.logs[1])


class LosesItsLog(LogSource):
    """Once everything is read, the broker loses the log and the group's offsets (as the development broker does
    when it restarts) and receives ``minutes`` of new readings; the member regains its partitions at the positions
    it had read to, as kafka-python keeps them, and its poll hands out what lies after those."""

    def __init__(self, topic: MemoryTopic, stop: threading.Event, minutes: range):
        super().__init__(topic)
        self.stop, self.minutes, self.empty_polls = stop, minutes, 0

    def poll(self, timeout_s, max_records=None, before_revoke=None):
        records = super().poll(timeout_s, max_records, before_revoke)
        if records:
            return records
        self.empty_polls += 1
        if self.empty_polls == 3:
            self.stop.set()
        if self.empty_polls != 2:  # the first: the daemon finishes and commits the batch in hand
            return []
        self.topic.logs = [[] for _ in self.topic.logs]
        self.topic.commits.clear()
        append(self.topic, self.minutes)
        self.regain(set(self.positions))
        return super().poll(timeout_s, max_records, before_revoke)


def test_a_partition_regained_where_the_group_committed_elsewhere_is_read_from_the_committed_offset(tmp_path):
    topic = MemoryTopic("readings", partitions=2)
    append(topic, range(20))
    stop, sink = threading.Event(), ListSink()
    daemon = Daemon(config(tmp_path), source=LosesItsLog(topic, stop, range(20, 50)), sink=sink, stop=stop,
                    checkpoints=topic.checkpoints, forecaster=StubForecaster(["power"], ["power"], L))
    assert daemon.run() == 0
    after = [p for p in map(json.loads, (r.value for r in sink.records)) if p["timestamp"] >= "2026-01-01T00:21"]
    # nothing committed any more: the new log from its start, each sensor's window filled anew from it
    assert len(after) == len(SENSORS) * (30 - (L - 1) + 1)
    assert topic.commits == {0: len(topic.logs[0]), 1: len(topic.logs[1])}


class Live(LogSource):
    """A caught-up member of a live topic: before each poll one more minute of readings arrives, so nothing waits
    behind the batch a poll hands out. Notes, at each poll, what had been committed and published."""

    def __init__(self, topic: MemoryTopic, stop: threading.Event, minutes: range, sink: ListSink):
        super().__init__(topic)
        self.stop, self.minutes, self.sink, self.seen = stop, iter(minutes), sink, []

    def poll(self, timeout_s, max_records=None, before_revoke=None):
        self.seen.append((self.topic.commits.get(0, 0), len(self.sink.records)))
        minute = next(self.minutes, None)
        if minute is None:
            self.stop.set()
            return []
        for s, sensor in enumerate(SENSORS):  # all in one partition: one poll hands out the whole minute
            value = json.dumps({"timestamp": f"2026-01-01T00:{minute:02d}:00", "values": {"power": reading(s, minute)}})
            self.topic.append(0, sensor.encode(), value.encode())
        return super().poll(timeout_s, max_records, before_revoke)


def test_a_batch_with_no_readings_waiting_behind_it_is_published_and_committed_before_the_next_poll(tmp_path):
    topic, stop, sink = MemoryTopic("readings", partitions=1), threading.Event(), ListSink()
    source = Live(topic, stop, range(10), sink)
    daemon = Daemon(config(tmp_path), source=source, sink=sink, stop=stop, checkpoints=topic.checkpoints,
                    forecaster=StubForecaster(["power"], ["power"], L))
    assert daemon.run() == 0
    # before poll k, the k - 1 minutes read so far: all committed, every full window among them forecast
    full = [len(SENSORS) * max(0, minutes - (L - 1) + 1) for minutes in range(11)]
    assert source.seen == [(len(SENSORS) * minutes, full[minutes]) for minutes in range(11)]
