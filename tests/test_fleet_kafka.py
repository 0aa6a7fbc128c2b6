"""Anomaly events, gap events and each sensor's health through the embedded broker, against offline figures.

Broker deviation met here: the development broker reads a partition's end offset
as its last batch's base offset, so reading the compacted health topic up to its
end (Kafka's documented meaning) may miss the newest round of records; the test
waits until a read shows every sensor's final figures, which the next round
makes true.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import daemon_overrides, level_model, make_forecaster, offline_forecasts, sample_lines
from daemon import DaemonProcess, wait_for
from test_daemon_kafka import collect, produce

from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.health_topic import read_health
from stream_forecaster.messages import UciLineParser
from stream_forecaster.store import ModelStore
from stream_forecaster.topics import ensure_topics

L = 6
SPAN = 15
SENSORS = ("meter-a", "meter-b", "meter-c")
SPIKE = ("meter-b", 25)
MISSING = ("meter-c", (15, 16, 17))


def readings():
    """Real minutes per sensor; meter-b's 25th reading 60 kW higher, meter-c's 15th to 17th '?'."""
    messages, accepted = [], {s: [] for s in SENSORS}
    for k, sensor in enumerate(SENSORS):
        for j, line in enumerate(sample_lines(40, start=700 * k)):
            date, time_, power, rest = line.split(";", 3)
            if sensor == MISSING[0] and j in MISSING[1]:
                messages.append((sensor, f"{date};{time_};?;?;?;?;?;?;?"))
                continue
            if (sensor, j) == SPIKE:
                line = f"{date};{time_};{float(power) + 60:.3f};{rest}"
            messages.append((sensor, line))
            accepted[sensor].append(line)
    return messages, accepted


def offline(forecaster, lines):
    """Per scored reading (one whose previous reading came a minute before): truth, forecast, persistence, time."""
    values, predicted = offline_forecasts(forecaster, lines)
    times = np.array([UciLineParser(["Global_active_power"]).parse(line)[0] for line in lines])
    rows = [k for k in range(L - 1, len(lines)) if times[k] - times[k - 1] <= 60]
    # the forecast made from the window ending at reading k - 1 is predicted[k - (L - 1)]
    return (values[rows, 0].astype(np.float64), predicted[[k - (L - 1) for k in rows], 0].astype(np.float64),
            values[[k - 1 for k in rows], 0].astype(np.float64), times[rows])


def ewm(x):
    weights = (1 - 2 / (SPAN + 1)) ** np.arange(len(x))[::-1]
    return float((weights * x).sum() / weights.sum())


def test_a_spike_is_one_anomaly_a_run_of_missing_readings_one_gap_and_health_matches_offline(
        broker, kafka_names, tmp_path, capsys):
    messages, accepted = readings()
    base = make_forecaster(sequence_length=L)
    scale = float(base.target_scaler.scale[0])  # a standardised model's forecasts share one scale
    figures = {s: offline(base, lines) for s, lines in accepted.items()}
    spike_time = UciLineParser(["Global_active_power"]).parse(accepted[SPIKE[0]][SPIKE[1]])[0]
    residuals = np.concatenate([(truth - forecast)[times != spike_time] for truth, forecast, _, times in
                                figures.values()]) / scale
    # a band just wider than every other reading's residual: the spike alone must fall outside it
    lower, upper = 1.5 * min(residuals.min(), -0.1), 1.5 * max(residuals.max(), 0.1)
    truth, forecast, _, times = figures[SPIKE[0]]
    spike_residual = float((truth - forecast)[times == spike_time][0]) / scale
    assert spike_residual > upper
    forecaster = base.with_metadata(scaled_units=True, anomaly={
        "quantiles": [0.005, 0.995], "lower": [lower], "upper": [upper], "sigma": [2.0]})
    store = ModelStore(tmp_path / "models")
    store.publish(forecaster.save)
    names = {**kafka_names, "events": f"events-{kafka_names['group']}", "health": f"health-{kafka_names['group']}"}
    overrides = daemon_overrides(broker.address, names, store.path, kafka__anomaly_topic=names["events"],
                                 kafka__health_topic=names["health"], metrics__health_interval="1s",
                                 metrics__health_span=str(SPAN), window__min_gap="2")
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, [names["input"], names["output"], names["events"]], partitions=2)
    daemon = DaemonProcess(overrides, tmp_path / "daemon.log")
    try:
        produce(config, messages)
        daemon.wait_ready()
        events = collect(config, names["events"], 2)
        assert len(events) == 2, daemon.output()
        by_type = {json.loads(r.value)["type"]: (r, json.loads(r.value)) for r in events}
        record, anomaly = by_type["anomaly"]
        spike_iso = str(np.datetime64(int(spike_time), "s"))
        assert record.key == SPIKE[0].encode() and anomaly["id"] == f"{SPIKE[0]}@{spike_iso}"
        assert anomaly["score"] == pytest.approx(spike_residual / 2.0, rel=1e-4)
        assert anomaly["model_version"] == "1"
        record, gap = by_type["gap"]
        assert record.key == MISSING[0].encode() and gap["missing"] == 3
        first_missing = UciLineParser(["Global_active_power"]).parse(sample_lines(40, 1400)[MISSING[1][0]])[0]
        assert gap["from"] == str(np.datetime64(int(first_missing) - 60, "s"))
        assert gap["to"] == str(np.datetime64(int(first_missing) + 3 * 60, "s"))

        def final():
            health = read_health(config.kafka)
            done = len(health) == len(SENSORS) and all(
                health[s]["scored"] == len(figures[s][0]) for s in SENSORS)
            return health if done else None

        health = wait_for(final, 60, "the health topic to hold every sensor's final figures")
        for sensor, (truth, forecast, persistence, _) in figures.items():
            got, error, baseline = health[sensor], forecast - truth, persistence - truth
            assert got["mae"] == pytest.approx(ewm(np.abs(error)), rel=1e-4)
            assert got["rmse"] == pytest.approx(np.sqrt(ewm(error ** 2)), rel=1e-4)
            assert got["persistence_rmse"] == pytest.approx(np.sqrt(ewm(baseline ** 2)), rel=1e-4)
            assert got["skill"] == pytest.approx(1 - np.sqrt(ewm(error ** 2)) / np.sqrt(ewm(baseline ** 2)),
                                                 rel=1e-3)
            assert got["coverage"] is None  # the model publishes no interval
        m = daemon.metrics()
        assert m["stream_forecaster_anomalies_total"] == 1 and m["stream_forecaster_gaps_total"] == 1
        assert m["stream_forecaster_health_sensors"] == len(SENSORS)

        # the command reads the same records, through either client
        worst = sorted(SENSORS, key=lambda s: health[s]["skill"])[:2]
        for client in ("kafka-python", "confluent"):
            cli = ["--set", f"kafka.client={client}"] + [a for o in overrides for a in ("--set", o)]
            assert main(["health", "--worst", "2", "--json", *cli]) == 0
            assert [r["sensor"] for r in json.loads(capsys.readouterr().out)] == worst
        assert main(["health", "--worst", "2", *[a for o in overrides for a in ("--set", o)]]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].startswith("3 sensors,") and [line.split()[0] for line in table[2:]] == worst
        assert daemon.terminate() == 0, daemon.output()
    finally:
        daemon.close()


def test_the_retrainer_retrains_when_the_skill_in_the_health_topic_stays_low(broker, kafka_names, tmp_path):
    from stream_forecaster.kafka_io import KafkaSink, KafkaStateLog
    from stream_forecaster.messages import OutRecord
    from stream_forecaster.retrain import Retrainer
    from stream_forecaster.testing import ManualClock

    topic = f"health-{kafka_names['group']}"
    config = load_config(None, [
        f"kafka.bootstrap_servers={broker.address}", f"kafka.health_topic={topic}", "retrain.trigger_skill=0",
        "retrain.trigger_for=2m", "retrain.min_interval=1h", "retrain.every=6h", "metrics.health_interval=1m",
        "retrain.metrics_port=0", f"model_store.path={tmp_path / 'models'}", "model.sequence_length=8",
    ], environ={})
    KafkaStateLog(config.kafka).create_compacted(topic, 2)
    sink = KafkaSink(config.kafka)

    def write(skills, at, scored=50):
        sink.publish([OutRecord(topic, sensor.encode(), json.dumps(
            {"sensor": sensor, "skill": skill, "scored": scored, "at": at}).encode()) for sensor, skill in skills])

    write([(f"s{i}", skill) for i, skill in enumerate([0.3, 0.1, -0.2, 0.5, 0.0])], "2026-01-01T10:00:00Z")
    write([("retired", -5.0)], "2026-01-01T08:00:00Z")  # evicted long ago: its last record stays
    write([("new", -9.0)], "2026-01-01T10:00:00Z", scored=3)  # too few scored forecasts to count
    write([("trailer", None)], "2026-01-01T07:00:00Z")  # the development broker may leave the newest batch out
    manual = ManualClock()
    # its cycles find no data file and fail at once: what starts them is under test, not the training
    r = Retrainer(config, tmp_path / "no-data-yet.txt", clock=manual)
    assert r.fleet_skill() == (pytest.approx(0.1), 5)

    write([(f"s{i}", -0.3) for i in range(5)], "2026-01-01T10:01:00Z")  # the world drifted
    write([("trailer", None)], "2026-01-01T07:00:00Z")

    def wait(seconds):
        manual.advance(seconds)
        if starts("skill") == 1:
            r.stop.set()
        return r.stop.is_set()

    def starts(reason):
        return r.metrics.registry.get_sample_value("stream_forecaster_retrain_starts_total", {"reason": reason})

    r.wait = wait
    assert r.run() == 0
    sink.close()
    assert starts("schedule") == 1 and starts("skill") == 1
    runs = sum(r.metrics.registry.get_sample_value("stream_forecaster_retrain_runs_total", {"outcome": o})
               for o in ("published", "rejected", "failed"))
    assert runs == 2 and r.metrics.registry.get_sample_value("stream_forecaster_retrain_runs_total",
                                                             {"outcome": "failed"}) == 2
    assert r.metrics.registry.get_sample_value("stream_forecaster_retrain_fleet_skill") == -0.3
    # read every minute, the skill is low from 60 s on, but the skill's cycle waits for retrain.min_interval after the
    # scheduled one (at 0 s): it starts at 3600 s, and the stop comes one wait later
    assert manual() == pytest.approx(3600 + 60)


def test_a_level_shift_on_every_sensor_drives_the_live_skill_down_and_starts_one_retraining_cycle(
        broker, kafka_names, tmp_path):
    """The whole chain: the daemon scores, writes each sensor's health, the retrainer reads the fleet's skill."""
    import threading

    from stream_forecaster.retrain import Retrainer
    from stream_forecaster.service import Daemon

    rng = np.random.default_rng(11)
    sensors = [f"site-{i}" for i in range(6)]
    model = level_model(1.0, [1.0 + 0.1 * rng.standard_normal(200) for _ in sensors], L)
    store = ModelStore(tmp_path / "models")
    store.publish(model.save)  # forecasts about 1.0: better than persistence while the readings hover there
    health = f"health-{kafka_names['group']}"
    overrides = daemon_overrides(broker.address, kafka_names, store.path, kafka__health_topic=health,
                                 metrics__health_interval="1s", metrics__health_span="10", metrics__port="0",
                                 model__jit_compile="false", retrain__trigger_skill="0", retrain__trigger_for="3s",
                                 retrain__min_interval="10s", retrain__every="1h", retrain__metrics_port="0")
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, [kafka_names["input"], kafka_names["output"]], partitions=2)

    def send(level, n=30):
        produce(config, [(s, repr(level + 0.1 * float(rng.standard_normal()))) for _ in range(n) for s in sensors])

    daemon = Daemon(config)
    serving = threading.Thread(target=daemon.run)
    retrainer = Retrainer(config, tmp_path / "no-data.txt")  # its cycles fail at once: what starts them is tested
    retraining = threading.Thread(target=retrainer.run)
    metric = retrainer.metrics.registry.get_sample_value
    serving.start()
    retraining.start()
    try:
        send(1.0)
        wait_for(lambda: (metric("stream_forecaster_retrain_fleet_skill") or 0) > 0.1, 90,
                 "the retrainer to read the healthy fleet's skill from the health topic")
        assert metric("stream_forecaster_retrain_starts_total", {"reason": "skill"}) == 0
        send(3.0)  # every sensor's level shifts: the model still forecasts 1.0
        wait_for(lambda: metric("stream_forecaster_retrain_starts_total", {"reason": "skill"}) == 1, 90,
                 "the low skill to start a cycle")
        assert metric("stream_forecaster_retrain_fleet_skill") < 0
    finally:
        retrainer.request_stop()
        daemon.request_stop()
        retraining.join(60)
        serving.join(60)
    # the next could start 10 s (retrain.min_interval) after it: stopped well before
    assert metric("stream_forecaster_retrain_starts_total", {"reason": "skill"}) == 1
    assert metric("stream_forecaster_retrain_starts_total", {"reason": "schedule"}) == 1
