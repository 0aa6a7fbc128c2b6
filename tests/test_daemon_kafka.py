"""The daemon as a process against the embedded broker: exact counts, same numbers, live metrics, clean stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import urllib.request

import numpy as np
import pytest
from conftest import daemon_setup, offline_forecasts, sample_lines
from daemon import DaemonProcess, wait_for
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream_forecaster.messages import UciLineParser
from stream_forecaster.model import Forecaster
from stream_forecaster.topics import read_topic

L = 6
SENSORS = ("house-a", "house-b", "house-c", "house-d")


@pytest.fixture(params=["kafka-python", "confluent"])
def setup(request, broker, kafka_names, tmp_path):
    """The daemon on either Kafka client: the same counts, numbers, dead letters and commits."""
    return daemon_setup(broker.address, kafka_names, tmp_path, partitions=3,
                        kafka__dead_letter_topic=kafka_names["dead"], kafka__client=request.param)


def readings():
    """Per sensor: real lines with '?' rows and garbage mixed in."""
    messages, accepted = [], {s: [] for s in SENSORS}
    for k, sensor in enumerate(SENSORS):
        for j, line in enumerate(sample_lines(30, start=500 * k)):
            if j == 9:
                messages.append((sensor, "?"))
            if j == 14:
                messages.append((sensor, "not;a;reading"))
                messages.append((sensor, "\udcff"))  # becomes a non-UTF-8 byte below
            if j == 20:
                date, time_, _ = line.split(";", 2)
                messages.append((sensor, f"{date};{time_};?;?;?;?;?;?;"))
                continue
            messages.append((sensor, line))
            accepted[sensor].append(line)
    return messages, accepted


def produce(config, messages):
    producer = KafkaProducer(bootstrap_servers=list(config.kafka.bootstrap_servers), acks="all")
    futures = [producer.send(config.kafka.input_topic, key=s.encode(),
                             value=v.encode("utf-8", "surrogateescape")) for s, v in messages]
    producer.flush()
    offsets = [f.get(timeout=10) for f in futures]
    producer.close()
    last = {}
    for m in offsets:
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    return last


def collect(config, topic, expected, timeout=90):
    got, stop = [], threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        for record in read_topic(config.kafka, topic, stop):
            got.append(record)
            if len(got) >= expected:
                break
    finally:
        timer.cancel()
    return got


def check_with_promtool(url):
    """``promtool check metrics`` (Debian's prometheus package) accepts the live exposition."""
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("CI"), "promtool is required in CI: apt-get install prometheus"
        return
    with urllib.request.urlopen(url) as response:
        text = response.read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_daemon_end_to_end(setup, tmp_path):
    config, overrides, store = setup
    messages, accepted = readings()
    expected = {s: len(lines) - (L - 1) + 1 for s, lines in accepted.items()}
    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        last_offsets = produce(config, messages)  # before the group first joins: earliest must not skip them
        daemon.wait_ready()
        predictions = collect(config, config.kafka.output_topic, sum(expected.values()))
        assert len(predictions) == sum(expected.values()), daemon.output()

        forecaster = Forecaster.load(store.directory("1"), "1")
        parser = UciLineParser(["Global_active_power"])
        by_sensor = {}
        for r in predictions:
            by_sensor.setdefault(r.key.decode(), []).append(json.loads(r.value))
        for sensor, lines in accepted.items():
            got = sorted(by_sensor[sensor], key=lambda p: p["source"]["offset"])
            assert len(got) == expected[sensor]
            _, expected_values = offline_forecasts(forecaster, lines)
            np.testing.assert_allclose([p["prediction"] for p in got], expected_values[:, 0], rtol=1e-5, atol=1e-6)
            assert {p["model_version"] for p in got} == {"1"}
            assert got[-1]["timestamp"] == np.datetime64(parser.parse(lines[-1])[0] + 60, "s").astype(str)

        dead = collect(config, config.kafka.dead_letter_topic, 2 * len(SENSORS))
        assert sorted(r.value for r in dead) == sorted([b"not;a;reading", b"\xff"] * len(SENSORS))
        assert all(dict(r.headers)["error"] for r in dead)

        n = {s: len(v) for s, v in accepted.items()}
        m = wait_for(lambda: (lambda m: m if m["stream_forecaster_predictions_total"] == sum(expected.values())
                              else None)(daemon.metrics()), 30, "the metrics to count every prediction")
        assert m['stream_forecaster_readings_total{outcome="accepted"}'] == sum(n.values())
        assert m['stream_forecaster_readings_total{outcome="missing"}'] == 2 * len(SENSORS)
        assert m['stream_forecaster_readings_total{outcome="invalid"}'] == 2 * len(SENSORS)
        # per sensor, the last forecast is pending and the one for its '?' minute (j == 20) has no reading to score
        assert m["stream_forecaster_scored_predictions_total"] == sum(expected.values()) - 2 * len(SENSORS)
        assert m["stream_forecaster_active_sensors"] == len(SENSORS)
        assert m["stream_forecaster_model_version"] == 1
        assert m["stream_forecaster_reading_to_published_seconds_count"] == sum(expected.values())
        assert daemon.status("/healthz") == 200
        check_with_promtool(daemon.url + "/metrics")

        assert daemon.terminate() == 0, daemon.output()
        consumer = KafkaConsumer(bootstrap_servers=list(config.kafka.bootstrap_servers),
                                 group_id=config.kafka.group_id, enable_auto_commit=False)
        # Compared with the offsets the producer was given, not end_offsets(): the development
        # broker reports a partition's end offset as the last batch's base offset.
        committed = {p: consumer.committed(TopicPartition(config.kafka.input_topic, p)) for p in last_offsets}
        consumer.close()
        assert committed == {p: o + 1 for p, o in last_offsets.items()}
    finally:
        daemon.close()
