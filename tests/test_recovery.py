"""Crashes and rebalances against the embedded broker: windows are rebuilt from the topic, nothing is
lost, and repeats are exactly the documented kind (same id, same forecast)."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from conftest import daemon_overrides, daemon_setup, make_forecaster, offline_forecasts, sample_lines
from daemon import DaemonProcess, wait_for
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from stream_forecaster.config import load_config
from stream_forecaster.model import Forecaster
from stream_forecaster.service import Daemon
from stream_forecaster.store import ModelStore
from stream_forecaster.testing import FakeRecord, ListSink, ListSource, ManualClock
from stream_forecaster.topics import ensure_topics, read_topic

L = 6
SENSORS = tuple(f"r{i}" for i in range(12))
# below what a refill needs (about 6 sensors x 5 readings a partition): a refill bounded by this fallback
# budget, as every refill was before commits carried their start, would come back partial
FALLBACK_BUDGET = "8"


@pytest.fixture
def env(broker, kafka_names, tmp_path):
    config, overrides, store = daemon_setup(broker.address, kafka_names, tmp_path, partitions=2,
                                            window__rebuild_messages=FALLBACK_BUDGET)
    lines = {s: [l for l in sample_lines(200, start=700 * i) if "?" not in l][:60] for i, s in enumerate(SENSORS)}
    return config, overrides, store, lines


def produce(config, lines, lo, hi):
    producer = KafkaProducer(bootstrap_servers=list(config.kafka.bootstrap_servers), acks="all")
    for j in range(lo, hi):
        for sensor in lines:
            producer.send(config.kafka.input_topic, key=sensor.encode(), value=lines[sensor][j].encode())
    producer.flush()
    producer.close()


class Output:
    """Reads the output topic on a thread, keeping every prediction in arrival order."""

    def __init__(self, config):
        self.records, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config):
        for record in read_topic(config.kafka, config.kafka.output_topic, self.stop):
            self.records.append((dict(record.headers)["prediction_id"].decode(), json.loads(record.value)))

    def ids(self):
        return {i for i, _ in self.records}

    def close(self):
        self.stop.set()
        self.thread.join(10)


def expected_ids(lines, upto):
    ids = set()
    for sensor, ls in lines.items():
        for line in ls[L - 2:upto]:
            stamp = np.datetime64(f"{_iso(line)}") + np.timedelta64(60, "s")
            ids.add(f"{sensor}@{stamp}")
    return ids


def _iso(line):
    date, time_ = line.split(";")[:2]
    d, m, y = date.split("/")
    return f"{y}-{int(m):02d}-{int(d):02d}T{time_}"


def check_forecasts(store, lines, records, upto):
    """Every prediction equals the offline forecast of its window over the whole, uninterrupted sequence."""
    forecaster = Forecaster.load(store.directory("1"), "1")
    for sensor, ls in lines.items():
        _, offline = offline_forecasts(forecaster, ls[:upto])
        by_id = {}
        for ident, p in records:
            if p["sensor"] == sensor:
                by_id.setdefault(ident, []).append(p["prediction"])
        ordered = sorted(by_id)  # ids sort by time within a sensor
        assert len(ordered) == len(offline)
        for ident, want in zip(ordered, offline[:, 0]):
            np.testing.assert_allclose(by_id[ident], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("when, snapshots, client", [
    ("clean_stop", "5m", "kafka-python"), ("after_commit", "0", "kafka-python"), ("mid_stream", "0", "kafka-python"),
    ("clean_stop", "0", "confluent"), ("mid_stream", "5m", "confluent")])
def test_restart_rebuilds_windows_and_loses_nothing(env, tmp_path, when, snapshots, client):
    """A clean stop (SIGTERM), or kill -9 once everything was committed, or kill -9 mid-stream; windows refilled
    by replaying their readings (snapshots "0") or from the snapshot written at the first commit and the
    readings after it; on either Kafka client."""
    config, overrides, store, lines = env
    overrides = [*overrides, f"window.snapshot_interval={snapshots}", f"kafka.client={client}"]
    out = Output(config)
    first = DaemonProcess(overrides, tmp_path / "first.log")
    try:
        first.wait_ready()
        produce(config, lines, 0, 30)
        if when == "mid_stream":
            wait_for(lambda: len(out.records) > 0, 60, "the first predictions")
        else:
            wait_for(lambda: out.ids() >= expected_ids(lines, 30), 60, "every reading so far to be predicted")
            wait_for(lambda: first.metrics()["stream_forecaster_consumer_lag"] == 0, 30, "commits to catch up")
        if when == "clean_stop":
            assert first.terminate() == 0
        else:
            first.process.kill()  # kill -9: no flush, no commit, no goodbye
            first.process.wait(10)
    finally:
        first.close()
    produce(config, lines, 30, 60)
    second = DaemonProcess(overrides, tmp_path / "second.log")
    try:
        second.wait_ready()
        wait_for(lambda: out.ids() >= expected_ids(lines, 60), 90, "every reading to be predicted after the restart")
        refills = re.findall(r"windows refilled from (a snapshot and )?(\d+) readings", second.output())
        if when == "mid_stream":  # a partition killed before its first commit is read again from the start instead
            assert len(refills) <= 2
        else:
            assert len(refills) == 2  # each partition
        if snapshots == "0":
            assert all(not snapshot and int(n) > 0 for snapshot, n in refills)
        else:
            assert all(snapshot for snapshot, _ in refills)
        assert second.terminate() == 0
    finally:
        second.close()
        out.close()
    assert out.ids() == expected_ids(lines, 60)  # nothing lost, nothing unexpected
    check_forecasts(store, lines, out.records, 60)
    repeats = len(out.records) - len(out.ids())
    print(f"{when}: {len(out.records)} forecasts, {len(out.ids())} distinct, {repeats} repeated")
    if when != "mid_stream":
        assert repeats == 0
    else:  # at most the readings of batches that were published but not yet committed when killed
        assert repeats <= 2 * config.kafka.max_poll_records


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_rebalance_hands_partitions_over_with_their_windows(env, tmp_path, client):
    config, overrides, store, lines = env
    # the replay, from the windows' oldest reading
    overrides = [*overrides, "window.snapshot_interval=0", f"kafka.client={client}"]
    out = Output(config)
    a = DaemonProcess(overrides, tmp_path / "a.log")
    b = DaemonProcess(overrides, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        wait_for(lambda: a.metrics()["stream_forecaster_ready"] == 1 and b.metrics()["stream_forecaster_ready"] == 1,
                 60, "both daemons to own a partition")
        produce(config, lines, 0, 30)
        wait_for(lambda: out.ids() >= expected_ids(lines, 30), 60, "every reading so far to be predicted")
        b_sensors = b.metrics()["stream_forecaster_active_sensors"]
        assert 0 < b_sensors < len(SENSORS)  # the sensors are split between the two
        b.process.kill()
        b.process.wait(10)
        produce(config, lines, 30, 60)
        wait_for(lambda: out.ids() >= expected_ids(lines, 60), 120, "the survivor to predict every reading")
        m = a.metrics()
        assert m["stream_forecaster_active_sensors"] == len(SENSORS)
        # exactly the readings b's sensors' windows held: the checkpoint's refill start, no earlier
        assert m["stream_forecaster_rebuilt_readings_total"] == (L - 1) * b_sensors
        assert a.terminate() == 0
    finally:
        a.close()
        b.close()
        out.close()
    assert out.ids() == expected_ids(lines, 60)
    check_forecasts(store, lines, out.records, 60)


def test_slow_batches_stay_inside_max_poll_interval(broker, kafka_names, tmp_path):
    """A model slow enough that a full batch would take longer than the poll interval: batches shrink,
    the member is never dropped, no rebalance happens, and every reading is forecast once."""
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L, hidden=(384, 384)).save)
    overrides = daemon_overrides(broker.address, kafka_names, store.path, kafka__max_poll_interval_ms="4000",
                                 kafka__max_poll_records="100000", model__layers="[1, 384, 384, 1]",
                                 data__features="[Global_active_power]")
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
    many = {s: [l for l in sample_lines(6000, start=6000 * i) if "?" not in l][:4000]
            for i, s in enumerate(SENSORS[:4])}
    produce(config, many, 0, 4000)
    out = Output(config)
    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(lambda: len(out.ids()) >= 4 * (4000 - (L - 2)), 300, "every reading of the backlog to be forecast")
        m = daemon.metrics()
        assert m["stream_forecaster_rebuilt_readings_total"] == 0
        assert "revoked" not in daemon.output() and "commit failed" not in daemon.output()
        assert len(out.records) == len(out.ids())  # nothing forecast twice
        assert daemon.terminate() == 0
    finally:
        daemon.close()
        out.close()


class RegainingSource(ListSource):
    """Partition 0 arrives with a committed offset of ``len(history)``; ``faults`` name the calls that fail once
    (``read_range`` after 2 records), as when the group coordinator moves during a rebalance."""

    def __init__(self, history, batch, stop, faults=(), stop_in_read=False):
        super().__init__([batch], stop_when_done=stop)
        self.history, self.faults, self.stop_in_read = history, set(faults), stop_in_read
        self.changes = (set(), {0}, set())

    def fail_once(self, call):
        if call in self.faults:
            self.faults.discard(call)
            raise KafkaTimeoutError(f"{call} timed out")

    def take_changes(self):
        changes, self.changes = self.changes, (set(), set(), set())
        return changes

    def committed(self, partition):
        self.fail_once("committed")
        return len(self.history)  # without a checkpoint: the fallback replays window.rebuild_messages

    def beginning(self, partition):
        return 0

    def read_range(self, partition, start, end, stop):
        yield from self.history[start:start + 2]
        if self.stop_in_read:
            stop.set()  # the signal arrives; the reader stops early, as KafkaSource.read_range does
            return
        self.fail_once("read_range")
        yield from self.history[start + 2:end]


def run_regaining(tmp_path, kept=30, **faults):
    store = ModelStore(tmp_path / "models")
    if store.current() is None:
        store.publish(make_forecaster(sequence_length=L).save)
    config = load_config(None, daemon_overrides("127.0.0.1:9", {"input": "in", "output": "out", "group": "g"},
                                                store.path, metrics__port="0"), environ={})
    lines = [line.encode() for line in sample_lines(40)]
    history = [FakeRecord("in", 0, i, b"s", line) for i, line in enumerate(lines[:kept])]
    batch = [FakeRecord("in", 0, kept + i, b"s", line) for i, line in enumerate(lines[kept:])]
    stop = threading.Event()
    source, sink = RegainingSource(history, batch, stop, **faults), ListSink()
    daemon = Daemon(config, source=source, sink=sink, stop=stop)
    assert daemon.run() == 0
    return daemon, source, sink


@pytest.mark.parametrize("kept", [30, 3])  # 3: fewer than a window, which a refill counted twice would fill
def test_a_broker_error_while_refilling_windows_is_tried_again_and_changes_no_forecast(tmp_path, caplog, kept):
    _, clean_source, clean = run_regaining(tmp_path, kept)
    daemon, source, sink = run_regaining(tmp_path, kept, faults=("committed", "read_range"))
    assert caplog.text.count("handling the new partitions failed (KafkaTimeoutError") == 2 and not source.faults
    # the refill cut short after 2 readings was dropped and done again, not counted twice
    assert [json.loads(r.value) for r in sink.records] == [json.loads(r.value) for r in clean.records]
    assert len(sink.records) == 40 - max(kept, L - 2) and source.commits == clean_source.commits == [{("in", 0): 40}]
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_rebuilding_partitions") == 0


def test_a_stop_during_a_rebuild_publishes_and_commits_nothing(tmp_path):
    """A SIGTERM while a regained partition's windows are refilled: the windows lack their newest readings,
    so the batch in hand must be left for the next owner, not forecast from them."""
    daemon, source, sink = run_regaining(tmp_path, stop_in_read=True)
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_rebuilt_readings_total") == 2
    assert sink.records == [] and source.commits == []


class StallingSink(ListSink):
    """Takes nothing until released: a broker that stopped acknowledging mid-batch."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def publish(self, records=(), stop=None):
        self.entered.set()
        self.release.wait()
        return super().publish(records, stop)


def test_while_a_batch_is_stuck_readiness_expires_and_the_last_poll_time_stands_still(tmp_path):
    """Readiness is worked out on the loop's thread (the Kafka consumer is not thread-safe) and read by the
    endpoint's; a loop stuck longer than the group waits for a member is no longer ready."""
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L).save)
    config = load_config(None, daemon_overrides("127.0.0.1:9", {"input": "in", "output": "out", "group": "g"},
                                                store.path, metrics__port="0"), environ={})
    stop = threading.Event()
    batch = [FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(sample_lines(L))]
    source, sink = ListSource([batch], stop_when_done=stop), StallingSink()
    now = [100.0]
    daemon = Daemon(config, source=source, sink=sink, clock=lambda: now[0], stop=stop)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        assert sink.entered.wait(60)
        gauge = daemon.metrics.registry.get_sample_value
        stuck_since = gauge("stream_forecaster_last_poll_timestamp_seconds")
        assert gauge("stream_forecaster_ready") == 1
        source.assigned = lambda: pytest.fail("the endpoint's thread called into the consumer")
        now[0] += config.kafka.max_poll_interval_ms / 1000  # the group has dropped the member by now
        assert gauge("stream_forecaster_ready") == 0
        assert gauge("stream_forecaster_last_poll_timestamp_seconds") == stuck_since
    finally:
        source.assigned = lambda: True
        sink.release.set()
        runner.join(60)
    assert len(sink.records) == 2  # L readings fill two windows of L - 1
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_last_poll_timestamp_seconds") > stuck_since


class FailingSource(ListSource):
    """Every poll raises, as kafka-python does for a fault that does not pass (an authorisation error, say)."""

    def __init__(self, stop):
        super().__init__([], stop_when_done=None)
        self.polls, self.stop = 0, stop

    def poll(self, timeout_s, max_records=None, before_revoke=None):
        self.polls += 1
        if self.polls >= 3:
            self.stop.set()
        raise KafkaTimeoutError("poll failed")


def test_a_poll_that_always_fails_leaves_the_last_poll_time_unset_for_the_stuck_alert(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L).save)
    config = load_config(None, daemon_overrides("127.0.0.1:9", {"input": "in", "output": "out", "group": "g"},
                                                store.path, metrics__port="0"), environ={})
    stop = threading.Event()
    source, clock = FailingSource(stop), ManualClock(stop=stop)
    daemon = Daemon(config, source=source, sink=ListSink(), stop=stop, clock=clock, wait=clock.wait, retry_s=2.5)
    assert daemon.run() == 0 and source.polls == 3
    assert clock.waited == [2.5, 2.5, 2.5]  # after each failed poll: the retry's wait, on the injected clock
    assert daemon.metrics.registry.get_sample_value("stream_forecaster_last_poll_timestamp_seconds") == 0
