"""Broker trouble against real broker processes: absent at start, stalled (SIGSTOP), restarted empty.

The daemon keeps running, reports not-ready while it cannot work, and resumes by itself.
Broker deviation met here: the development broker keeps everything in memory, so a restarted
broker has lost topics and committed offsets (Apache Kafka would keep both); the test recreates
the topics, as an operator would, and checks the daemon copes with the reset offsets.
"""

from __future__ import annotations

import signal
import threading

import pytest
from conftest import make_forecaster
from daemon import DaemonProcess, wait_for
from kafka import KafkaAdminClient
from test_recovery import SENSORS, Output, check_forecasts, expected_ids, produce

from stream_forecaster.config import load_config
from stream_forecaster.devbroker import DevBroker, free_port
from stream_forecaster.store import ModelStore
from stream_forecaster.topics import ensure_topics

L = 6


@pytest.fixture(params=["kafka-python", "confluent"])
def setup(request, tmp_path):
    """A store with a tiny model, and the daemon's settings on either Kafka client."""
    from conftest import sample_lines

    store = ModelStore(tmp_path / "models")
    store.publish(make_forecaster(sequence_length=L).save)
    port = free_port()
    overrides = [f"kafka.bootstrap_servers=127.0.0.1:{port}", "kafka.session_timeout_ms=6000",
                 f"model_store.path={store.path}", "model.sequence_length=6", "data.features=[Global_active_power]",
                 "model.layers=[1, 8, 1]", f"kafka.client={request.param}"]
    config = load_config(None, overrides, environ={})
    lines = {s: [l for l in sample_lines(200, start=700 * i) if "?" not in l][:60] for i, s in enumerate(SENSORS)}
    return config, overrides, store, lines, port


def committed(config) -> int:
    """The readings the daemon's group has committed, over every partition."""
    admin = KafkaAdminClient(bootstrap_servers=list(config.kafka.bootstrap_servers))
    try:
        return sum(o.offset for o in admin.list_group_offsets(config.kafka.group_id)[config.kafka.group_id].values())
    finally:
        admin.close()


def test_broker_absent_at_start(setup, tmp_path):
    config, overrides, store, lines, port = setup
    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        wait_for(lambda: "retrying in" in daemon.output(), 60, "the daemon to retry the absent broker")
        assert daemon.status("/healthz") == 200 and daemon.status("/readyz") == 503
        with DevBroker(port=port):
            ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
            out = Output(config)
            daemon.wait_ready()
            produce(config, lines, 0, 30)
            wait_for(lambda: out.ids() >= expected_ids(lines, 30), 90, "every reading to be predicted")
            assert daemon.terminate() == 0
            out.close()
        assert out.ids() == expected_ids(lines, 30)
        check_forecasts(store, lines, out.records, 30)
    finally:
        daemon.close()


def test_broker_stalled_then_resumed(setup, tmp_path):
    config, overrides, store, lines, port = setup
    with DevBroker(port=port) as broker:
        ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
        out = Output(config)
        daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            produce(config, lines, 0, 30)
            wait_for(lambda: out.ids() >= expected_ids(lines, 30), 60, "the readings before the stall")
            # stalled while the daemon waits in poll, which a stall makes fail; one that comes while it waits for
            # the acknowledgement of a checkpoint leaves the loop waiting, ready as far as it knows, for longer
            # than this test waits
            wait_for(lambda: committed(config) == 30 * len(lines), 60, "the daemon to commit every reading")
            broker.process.send_signal(signal.SIGSTOP)
            try:
                wait_for(lambda: daemon.status("/readyz") == 503, 60, "the daemon to report not-ready")
                late = threading.Thread(target=produce, args=(config, lines, 30, 60))
                late.start()  # blocks in the producer until the broker runs again
                assert daemon.process.poll() is None
            finally:
                broker.process.send_signal(signal.SIGCONT)
            late.join(120)
            wait_for(lambda: out.ids() >= expected_ids(lines, 60), 120, "every reading after the stall")
            wait_for(lambda: daemon.status("/readyz") == 200, 60, "the daemon to be ready again")
            assert daemon.terminate() == 0
        finally:
            daemon.close()
            out.close()
    assert out.ids() == expected_ids(lines, 60)
    check_forecasts(store, lines, out.records, 60)


def test_broker_restarted_empty(setup, tmp_path):
    config, overrides, store, lines, port = setup
    daemon, out = DaemonProcess(overrides, tmp_path / "daemon.log"), None
    try:
        with DevBroker(port=port):
            ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
            out = Output(config)
            daemon.wait_ready()
            produce(config, lines, 0, 30)
            wait_for(lambda: out.ids() >= expected_ids(lines, 30), 60, "the readings before the restart")
            out.close()
        with DevBroker(port=port):  # same address, nothing kept
            ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
            out = Output(config)
            produce(config, lines, 30, 60)
            # the offsets the daemon had committed are gone; at the latest, each sensor is forecast again
            # once a fresh window has filled from the new readings
            later = {i for i in expected_ids(lines, 60) - expected_ids(lines, 30 + L - 2)}
            wait_for(lambda: out.ids() >= later, 120, "forecasts of the readings sent after the restart")
            assert daemon.process.poll() is None
            if config.kafka.client == "kafka-python":
                # kafka-python 3.0's idempotent producer does not survive the broker losing its state
                assert daemon.metrics()["stream_forecaster_producer_recreations_total"] >= 1
            assert daemon.terminate() == 0
    finally:
        if out is not None:  # its reader must not outlive the test, logging into the next ones
            out.close()
        daemon.close()
