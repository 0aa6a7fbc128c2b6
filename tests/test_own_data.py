"""A user's own sensors: their column names and sizes, in CSV, JSON lines or only in the topic.

Broker deviation met here: none beyond the relay kcat needs (see test_kcat_interop).
"""

from __future__ import annotations

import datetime as dt
import json
import threading

import numpy as np
import pytest
from conftest import sample_lines
from daemon import DaemonProcess, wait_for

from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.messages import UciLineParser
from stream_forecaster.store import ModelStore
from stream_forecaster.topics import ensure_topics, read_topic

MODEL = ["--set", "model.sequence_length=10", "--set", "model.units=[8]", "--set", "model.batch_size=64",
         "--set", "model.epochs=1", "--set", "data.features=[load_kw, volts]", "--set", "data.targets=[load_kw]"]


def readings(n: int, start: int):
    """``n`` (ISO time, active power, voltage) of the real sample from data line ``start``, missing ones left out."""
    parser = UciLineParser(["Global_active_power", "Voltage"])
    out = []
    for line in sample_lines(n, start):
        parsed = parser.parse(line)
        if isinstance(parsed, tuple):
            stamp, (power, volts) = parsed
            out.append((dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), power, volts))
    return out


# (sensor, a, b, slice of the sample): "big" is "small" ten times larger and shifted, "mid" another stretch
FLEET = (("small", 1.0, 0.0, 0), ("big", 10.0, 3.0, 0), ("mid", 0.5, 0.0, 5000))


def fleet_csv(path, n=1500):
    rows = []
    for sensor, a, b, start in FLEET:
        rows += [(t, sensor, a * p + b, v) for t, p, v in readings(n, start)]
    rows.sort()  # by time, the sensors interleaved, as a fleet's export is
    rows.insert(7, (rows[7][0], "small", "?", 230.0))  # a missing value: skipped and counted
    path.write_text("ts,site,load_kw,volts\n" + "".join(f"{t},{s},{p},{v}\n" for t, s, p, v in rows))
    return path


def store_args(tmp_path):
    return ["--set", f"model_store.path={tmp_path / 'models'}"]


def test_a_csv_fleet_with_its_own_columns_trains_evaluates_and_scores_each_sensor(tmp_path, capsys):
    data = fleet_csv(tmp_path / "fleet.csv")
    own = [*MODEL, "--set", "data.sensor_column=site", *store_args(tmp_path)]
    assert main(["train", "--data", str(data), "--quiet", *own]) == 0
    meta = ModelStore(tmp_path / "models").metadata("1").to_dict()
    assert meta["layers"] == [2, 8, 1] and meta["normalization"] == {"method": "window"}
    assert meta["data"]["sensors"] == 3 and meta["data"]["missing"] == 1
    capsys.readouterr()

    assert main(["evaluate", "--data", str(data), "--json", *own]) == 0
    report = json.loads(capsys.readouterr().out)
    per_sensor = report["per_sensor"]
    assert set(per_sensor) == {"small", "big", "mid"} and sum(s["n"] for s in per_sensor.values()) == report["n"]
    assert report["worst_sensors"][0] == min(per_sensor, key=lambda s: per_sensor[s]["skill_rmse"])
    # the same readings ten times larger and shifted: errors ten times larger, the same skill
    small, big = per_sensor["small"], per_sensor["big"]
    assert big["rmse"] == pytest.approx(10 * small["rmse"], rel=1e-3)
    assert big["skill_rmse"] == pytest.approx(small["skill_rmse"], abs=1e-3)
    assert 0 <= report["per_target"]["load_kw"]["coverage"] <= 1

    assert main(["evaluate", "--data", str(data), "--worst", "2", *own]) == 0
    table = capsys.readouterr().out
    assert "3 sensors" in table and "the 2 lowest skills" in table


def test_a_fleet_past_the_window_budget_trains_and_tests_on_samples_of_every_sensor(tmp_path):
    data = fleet_csv(tmp_path / "fleet.csv", n=800)
    assert main(["train", "--data", str(data), "--quiet", *MODEL, "--set", "data.sensor_column=site",
                 "--set", "model.max_windows=300", *store_args(tmp_path)]) == 0
    meta = ModelStore(tmp_path / "models").metadata("1").to_dict()
    windows = meta["data"]
    assert windows["train_windows"] + windows["validation_windows"] <= 300 < windows["sampled_from"]["train"]
    per_sensor = meta["test"]["per_sensor"]
    # the held-out sample: a ninth of the budget (data.train_split 0.9), shared equally by the sensors
    assert windows["test_windows"] == sum(s["n"] for s in per_sensor.values()) == 34
    assert {name: s["n"] >= 11 for name, s in per_sensor.items()} == {"small": True, "big": True, "mid": True}


def test_a_misnamed_column_says_what_the_file_has(tmp_path, capsys):
    data = fleet_csv(tmp_path / "fleet.csv", n=50)
    code = main(["train", "--data", str(data), *MODEL, "--set", "data.features=[load, volts]",
                 "--set", "data.targets=[load]", *store_args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "load" in err and "the file has: ts, site, load_kw, volts" in err and "Traceback" not in err


def test_train_from_a_version_continues_it_on_json_lines_of_one_site(tmp_path, capsys):
    assert main(["train", "--data", str(fleet_csv(tmp_path / "fleet.csv", n=800)), "--quiet", *MODEL,
                 "--set", "data.sensor_column=site", *store_args(tmp_path)]) == 0
    site = tmp_path / "site.jsonl"
    site.write_text("".join(json.dumps({"sensor": "new-site", "timestamp": t,
                                        "values": {"load_kw": 40 * p, "volts": v}})
                            + "\n" for t, p, v in readings(800, 9000)))
    assert main(["train", "--data", str(site), "--from", "1", "--quiet", *MODEL, *store_args(tmp_path)]) == 0
    meta = ModelStore(tmp_path / "models").metadata("2").to_dict()
    assert meta["training"]["warm_start_from"] == "1" and meta["data"]["source"] == str(site)
    capsys.readouterr()
    code = main(["train", "--data", str(site), "--from", "2", *MODEL, "--set", "model.sequence_length=12",
                 *store_args(tmp_path)])
    assert code == 2 and "set data.features, data.targets and model.sequence_length" in capsys.readouterr().err


def test_a_first_model_from_the_topic_alone_then_the_daemon_forecasts_every_sensor(
        broker, kafka_names, tmp_path, capsys):
    """JSON readings of three sensors of different sizes, as kcat would produce them, and no file at all."""
    from kafka import KafkaProducer

    overrides = {"kafka.bootstrap_servers": broker.address, "kafka.input_topic": kafka_names["input"],
                 "kafka.output_topic": kafka_names["output"], "kafka.group_id": kafka_names["group"],
                 "kafka.session_timeout_ms": "6000", "model_store.path": str(tmp_path / "models"),
                 "model.sequence_length": "10", "model.units": "[8]", "model.batch_size": "64", "model.epochs": "1",
                 "data.features": "[load_kw, volts]", "data.targets": "[load_kw]"}
    config = load_config(None, [f"{k}={v}" for k, v in overrides.items()], environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=2)
    sizes = {"pump-7": 0.1, "meter-a": 1.0, "substation": 25.0}
    history = {sensor: readings(400, 2000 * i) for i, sensor in enumerate(sizes)}
    producer = KafkaProducer(bootstrap_servers=broker.address)
    for sensor, rows in history.items():
        for t, p, v in rows:
            producer.send(config.kafka.input_topic, key=sensor.encode(),
                          value=json.dumps({"timestamp": t,
                                            "values": {"load_kw": sizes[sensor] * p, "volts": v}}).encode())
    producer.flush()
    producer.close()

    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--from-topic", "--quiet", *args]) == 0
    out = capsys.readouterr().out
    assert "model version 1 written" in out
    assert ModelStore(tmp_path / "models").metadata("1").to_dict()["data"]["sensors"] == 3

    daemon = DaemonProcess([f"{k}={v}" for k, v in overrides.items()], tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        expected = sum(len(rows) - 9 + 1 for rows in history.values())
        wait_for(lambda: daemon.metrics().get("stream_forecaster_predictions_total") == expected, 120,
                 f"{expected} predictions")
    finally:
        assert daemon.terminate() == 0
        daemon.close()
    stop = threading.Event()
    timer = threading.Timer(60, stop.set)
    timer.start()
    got = {}
    for record in read_topic(config.kafka, config.kafka.output_topic, stop):
        p = json.loads(record.value)
        got.setdefault(p["sensor"], []).append(p)
        if sum(map(len, got.values())) >= expected:
            break
    timer.cancel()
    assert set(got) == set(sizes)
    for sensor, predictions in got.items():
        loads = np.array([sizes[sensor] * p for _, p, _ in history[sensor]])
        forecasts = np.array([p["prediction"] for p in predictions])
        # each sensor's forecasts are in its own units: within its own range, not the fleet's
        assert loads.min() - loads.std() <= forecasts.min() and forecasts.max() <= loads.max() + loads.std()
        assert all(p["lower"] <= p["prediction"] <= p["upper"] for p in predictions)


def test_a_time_column_of_dates_alone_is_warned_about(tmp_path, caplog):
    from stream_forecaster.retrain import read_file

    path = tmp_path / "split.csv"
    path.write_text("Date,Time,x\n"
                    + "".join(f"2007-04-0{d},{h:02d}:00:00,{d + h}\n" for d in (1, 2) for h in range(24)))
    with caplog.at_level("WARNING", logger="stream_forecaster.retrain"):
        series = read_file(path, ["x"], load_config(None, [], environ={}).data)
    assert len(series) == 2 and series.duplicates == 46
    assert "46 readings repeat a time" in caplog.text and "data.time_column" in caplog.text
