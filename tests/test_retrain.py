"""The retrainer on files: publish, gate, failures, schedule; and the `models` commands."""

from __future__ import annotations

import json
import logging
import socket
import threading
import tracemalloc

import numpy as np
import pytest
from conftest import sample_lines, write_uci
from daemon import wait_for

from stream_forecaster import retrain
from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.files import SAMPLE_PATH
from stream_forecaster.retrain import Retrainer, series_from_records
from stream_forecaster.testing import FakeRecord

# the level of one column, held steps off: an untrained model is then clearly worse, which the gate tests need
BASE = ["model.sequence_length=8", "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
        "model.batch_size=128", "data.ratio=0.15", "model.epochs=1", "model.min_step=0"]


def retrainer(tmp_path, *overrides, data=SAMPLE_PATH):
    config = load_config(None, [*BASE, f"model_store.path={tmp_path / 'models'}", *overrides], environ={})
    return Retrainer(config, data)


def count(r, outcome):
    return r.metrics.registry.get_sample_value("stream_forecaster_retrain_runs_total", {"outcome": outcome})


def test_first_cycle_publishes_with_the_gate_in_the_metadata(tmp_path):
    r = retrainer(tmp_path)
    outcome = r.run_once()
    assert (outcome.outcome, outcome.version) == ("published", "1")
    gate = r.store.metadata("1").to_dict()["gate"]
    assert gate["decision"] == "published" and gate["current"] is None and gate["metric"] == "rmse"
    assert gate["candidate"] == pytest.approx(r.store.metadata("1").to_dict()["test"]["rmse"])
    assert count(r, "published") == 1
    assert r.metrics.registry.get_sample_value("stream_forecaster_retrain_error", {"model": "candidate"}) == \
        pytest.approx(gate["candidate"])


@pytest.mark.parametrize("shadow", [False, True])
def test_warm_start_beats_and_replaces_the_current_model(tmp_path, shadow):
    r = retrainer(tmp_path, "model.epochs=1", f"retrain.shadow={str(shadow).lower()}")
    r.run_once()
    assert r.store.current() == "1" and r.store.shadow() is None  # no model to compare with live: served at once
    outcome = retrainer(tmp_path, "model.epochs=2", f"retrain.shadow={str(shadow).lower()}").run_once()
    assert outcome.outcome == "published" and outcome.candidate_error < outcome.current_error
    meta = r.store.metadata("2").to_dict()
    assert meta["training"]["warm_start_from"] == "1"
    assert meta["normalization"] == r.store.metadata("1").to_dict()["normalization"]  # fine-tuning keeps the scaling
    # with retrain.shadow the daemons decide, on live readings, whether it replaces the current model
    assert (r.store.current(), r.store.shadow()) == (("1", "2") if shadow else ("2", None))


def test_a_new_network_shape_trains_from_scratch_and_is_still_gated(tmp_path, caplog):
    retrainer(tmp_path).run_once()
    with caplog.at_level(logging.INFO, logger="stream_forecaster.retrain"):
        outcome = retrainer(tmp_path, "model.layers=[1, 12, 1]").run_once()
    # warm-started, it would have kept version 1's network of 8 units under metadata that says 12
    assert "layers [1, 8, 1] predicting the change with window normalisation, the configuration asks for [1, 12, 1]" \
        in caplog.text
    assert outcome.current_error is not None  # still compared with version 1, which the daemon can go on serving


def test_a_stop_after_training_publishes_nothing(tmp_path, monkeypatch):
    r = retrainer(tmp_path)
    gate = r._gate
    monkeypatch.setattr(r, "_gate", lambda *a: (r.stop.set(), gate(*a))[1])  # a signal once training is over
    with pytest.raises(KeyboardInterrupt, match="before publishing"):
        r.run_once()
    assert r.store.versions() == []


def test_a_missing_file_fails_a_cycle_in_one_line_and_an_unwritable_store_stops_the_retrainer(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    args = [a for o in BASE for a in ("--set", o)]
    # a file not there yet fails its cycle in one line (later cycles may find it: see the schedule test)
    assert main(["retrain", "--once", "--data", str(tmp_path / "absent.txt"), *args,
                 "--set", f"model_store.path={tmp_path / 'models'}"]) == 1
    err = capsys.readouterr().err
    assert "absent.txt: no such file" in err and "Traceback" not in err
    assert main(["retrain", "--once", "--data", str(SAMPLE_PATH), *args,
                 "--set", f"model_store.path={tmp_path / 'file' / 'models'}"]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "model_store.path" in err and "Traceback" not in err


def test_a_metrics_port_in_use_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["retrain", "--data", str(SAMPLE_PATH), "--set", f"model_store.path={tmp_path / 'models'}",
                     "--set", f"retrain.metrics_port={port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_worse_candidate_is_rejected_and_the_store_is_untouched(tmp_path):
    retrainer(tmp_path, "model.epochs=2").run_once()
    # from scratch with a learning rate that cannot move the random weights: a deliberately worse model
    worse = retrainer(tmp_path, "retrain.warm_start=false", "model.learning_rate=1e-9")
    before = sorted(p.name for p in (tmp_path / "models").iterdir())
    outcome = worse.run_once()
    assert outcome.outcome == "rejected" and outcome.candidate_error > outcome.current_error
    assert "does not beat the current" in outcome.reason
    assert outcome.candidate_error >= outcome.persistence_error and "does not beat persistence" in outcome.reason
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == before
    assert worse.store.current() == "1" and count(worse, "rejected") == 1


def test_min_improvement_is_required(tmp_path):
    retrainer(tmp_path).run_once()
    outcome = retrainer(tmp_path, "retrain.min_improvement=0.99").run_once()
    assert outcome.outcome == "rejected" and "by 99.0%" in outcome.reason


def test_a_current_model_whose_error_is_not_finite_is_replaced_by_any_finite_candidate(tmp_path):
    gate = retrainer(tmp_path, "retrain.min_improvement=0.5")._gate
    assert gate(0.3, float("nan"), 0.4) is None  # a broken model (null forecasts) must not hold its place for ever
    assert "not finite" in gate(float("nan"), 0.3, 0.4)


def test_the_gate_refuses_a_candidate_worse_than_persistence_and_says_which_test_it_failed(tmp_path):
    gate = retrainer(tmp_path, "retrain.min_improvement=0.1")._gate
    assert gate(0.3, 0.4, 0.35) is None
    beats_current_only = gate(0.3, 0.4, 0.29)
    assert "does not beat persistence 0.29" in beats_current_only and "current" not in beats_current_only
    assert gate(0.3, None, 0.3) == "candidate 0.3 does not beat persistence 0.3"  # a first model too
    beats_persistence_only = gate(0.3, 0.31, 0.4)
    assert "does not beat the current 0.31 by 10.0%" in beats_persistence_only
    assert "persistence" not in beats_persistence_only
    both = gate(0.5, 0.4, 0.45)
    assert "persistence 0.45" in both and "current 0.4" in both


def test_failures_are_counted_and_leave_the_store_alone(tmp_path, caplog):
    retrainer(tmp_path).run_once()
    missing = retrainer(tmp_path, data=tmp_path / "absent.txt").run_once()
    assert missing.outcome == "failed" and "no such file" in missing.reason
    assert "Traceback" not in caplog.text  # a user's error is a line, not a stack
    exploding = retrainer(tmp_path, "retrain.warm_start=false", "model.optimizer=sgd", "model.learning_rate=10",
                          "model.loss=mse").run_once()
    # an optimiser step this large overflows: the loss is not finite, or the candidate's error is not
    assert exploding.outcome in ("failed", "rejected") and "finite" in exploding.reason
    assert retrainer(tmp_path).store.versions() == ["1"]


def test_runs_on_schedule_and_goes_on_after_a_failed_cycle(tmp_path):
    data = tmp_path / "later.txt"
    r = retrainer(tmp_path, "retrain.every=1s", "retrain.metrics_port=0", data=data)
    thread = threading.Thread(target=r.run)
    thread.start()
    try:
        wait_for(lambda: count(r, "failed") >= 1, 60, "a first cycle to fail (no data yet)")
        write_uci(data, sample_lines(3000))
        wait_for(lambda: count(r, "published") >= 1, 120, "a later cycle to publish")
    finally:
        r.request_stop()
        thread.join(60)
    assert not thread.is_alive()
    assert r.store.current() == "1"


def test_series_from_records_uses_the_daemons_rules_per_sensor():
    lines = sample_lines(6)
    records = [FakeRecord("in", 0, i, key, value.encode(), timestamp=0) for i, (key, value) in enumerate([
        (b"b", lines[0]), (b"a", lines[1]), (b"b", "?"), (b"a", "garbage"), (b"b", lines[2]),
        (b"a", "01/01/1990;00:00:00;1;1;1;1;1;1;1"), (b"a", lines[3]),
    ])]
    series = series_from_records(records, ["Global_active_power"], 65536, history_s=86400, source="t")
    # the 1990 reading lies outside a one-day history and is dropped; '?' is missing; garbage is invalid
    assert series.segments == (0, 2)  # a: 2 readings, then b: 2 readings
    assert series.values[:, 0].tolist() == pytest.approx([float(lines[i].split(";")[2]) for i in (1, 3, 0, 2)])
    assert (series.missing, series.malformed, series.lines) == (1, 1, 7)


T0 = 1_709_251_200  # 2024-03-01T00:00:00Z


def test_series_from_records_keeps_each_sensors_recent_readings_in_arrival_order(monkeypatch):
    """Times carried or from Kafka, missing and invalid readings, stale ones, any number of blocks."""
    uci = "1/3/2024;00:03:00;0.5;0.1;240;2;0;0;0"
    # (key, value, Kafka timestamp in ms, the reading it is: (sensor, time, value), or what it counts as)
    cases = [
        (b"pump", {"timestamp": "2024-03-01T00:00:00Z", "value": 1.5}, (T0 + 5) * 1000, ("pump", T0, 1.5)),
        (b"meter", {"values": {"Global_active_power": 2.25}}, (T0 + 60.75) * 1000, ("meter", T0 + 60.75, 2.25)),
        (b"pump", "?", T0 * 1000, "missing"),
        (b"meter", "3.5", (T0 + 120) * 1000, ("meter", T0 + 120, 3.5)),
        (b"old", {"timestamp": "2024-01-31T00:00:00Z", "value": 9.0}, T0 * 1000, ("old", T0 - 30 * 86400, 9.0)),
        (b"pump", {"values": {"Global_active_power": None}}, T0 * 1000, "missing"),
        (None, uci, 0, ("default", T0 + 180, 0.5)),
        (b"pump", "garbage", T0 * 1000, "invalid"),
        (b"meter", {"timestamp": "2024-03-01T00:00:30", "value": 4.0}, (T0 + 300) * 1000, ("meter", T0 + 30, 4.0)),
        (b"pump", {"timestamp": "2024-03-01T00:04:00.5+00:00", "value": -1.25}, 0, ("pump", T0 + 240.5, -1.25)),
        (b"meter", {"timestamp": "2024-02-28T00:00:00Z", "value": 7.0}, T0 * 1000, ("meter", T0 - 2 * 86400, 7.0)),
        (b"pump", "", T0 * 1000, "invalid"),
    ]
    records = [FakeRecord("in", 0, i, key, (value if isinstance(value, str) else json.dumps(value)).encode(),
                          timestamp=int(ms)) for i, (key, value, ms, _) in enumerate(cases)]
    readings = [r for *_, r in cases if isinstance(r, tuple)]
    newest = max(t for _, t, _ in readings)
    kept = sorted((r for r in readings if r[1] >= newest - 86400), key=lambda r: r[0])  # stable: arrival order
    names = [s for s, _, _ in kept]
    for block in (65536, 2):  # 2: readings of one sensor spread over many blocks
        monkeypatch.setattr(retrain, "_BLOCK", block)
        series = series_from_records(records, ["Global_active_power"], 65536, history_s=86400, source="t")
        assert series.sensors == ("default", "meter", "pump")  # "old" had nothing recent: gone, name and all
        assert series.segments == tuple(names.index(s) for s in series.sensors) == (0, 1, 4)
        assert series.timestamps.dtype == np.int64 and series.values.dtype == np.float32
        assert series.timestamps.tolist() == [int(t) for _, t, _ in kept]  # whole seconds, as the daemon's
        assert series.values.shape == (len(kept), 1) and series.values[:, 0].tolist() == [v for *_, v in kept]
        assert (series.lines, series.missing, series.malformed) == (12, 2, 2)
    empty = series_from_records([], ["Global_active_power"], 65536, history_s=86400, source="t")
    assert (len(empty), empty.values.shape, empty.segments, empty.sensors) == (0, (0, 1), (0,), ())


def test_reading_history_takes_tens_of_bytes_a_reading():
    n, sensors = 150_000, 100

    def records():  # made as they are read, as from Kafka: only the reader's own memory is counted
        for i in range(n):
            yield FakeRecord("in", 0, i, b"sensor-%03d" % (i % sensors), b'{"values":{"a":%d.5,"b":-%d}}' % (i, i % 7),
                             timestamp=1_700_000_000_000 + i // sensors * 60_000)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        series = series_from_records(records(), ["a", "b"], 65536, history_s=14 * 86400, source="t")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(series) == n and len(series.sensors) == sensors
    # the result alone is 16 bytes a reading (an int64 time, two float32 values); lists of Python floats took 480
    assert peak / n < 100


def test_a_cycle_past_the_budget_trains_and_gates_on_samples(tmp_path):
    retrainer(tmp_path, "model.max_windows=300").run_once()
    r = retrainer(tmp_path, "model.max_windows=300", "retrain.min_improvement=0")
    outcome = r.run_once()
    assert outcome.current_error is not None  # the current model scored on the candidate's held-out sample
    meta = r.store.metadata(r.store.current()).to_dict()
    assert meta["data"]["train_windows"] + meta["data"]["validation_windows"] <= 300
    assert meta["data"]["sampled_from"]["train"] > 300
    assert meta["gate"]["test_windows"] == meta["data"]["test_windows"] == 34  # ceil(300 * 0.1 / 0.9)


@pytest.fixture
def store_with_versions(tmp_path):
    for _ in range(3):
        retrainer(tmp_path, "retrain.min_improvement=0").run_once()
    return ["--set", f"model_store.path={tmp_path / 'models'}"]


def test_models_commands(store_with_versions, capsys):
    args = store_with_versions
    assert main(["models", "list", *args]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["version", "created", "trained"]
    current_rows = [row for row in listing if row.startswith("*")]
    assert len(current_rows) == 1
    assert main(["models", "show", "1", *args]) == 0
    assert json.loads(capsys.readouterr().out)["gate"]["decision"] == "published"
    assert main(["models", "promote", "1", *args]) == 0
    assert "version 1" in capsys.readouterr().out
    assert main(["models", "rollback", *args]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err
    assert main(["models", "promote", "9", *args]) == 2
    assert main(["models", "show", *args]) == 2
    capsys.readouterr()


def test_rollback_in_an_empty_store_says_to_train_first(tmp_path, capsys):
    assert main(["models", "rollback", "--set", f"model_store.path={tmp_path / 'models'}"]) == 2
    assert "holds no model yet (train one" in capsys.readouterr().err


def test_rollback_goes_to_the_previous_version(tmp_path, capsys):
    for epochs in (1, 2, 3):
        retrainer(tmp_path, f"model.epochs={epochs}", "retrain.min_improvement=0").run_once()
    versions = retrainer(tmp_path).store.versions()
    current = retrainer(tmp_path).store.current()
    assert main(["models", "rollback", "--set", f"model_store.path={tmp_path / 'models'}"]) == 0
    assert retrainer(tmp_path).store.current() == versions[versions.index(current) - 1]
