"""Anomaly and gap events, and each sensor's health, from the pipeline on in-memory records.

The forecaster is the stub (the last reading plus a step of the window's
spread), so every expected figure is computed here from the readings alone.
"""

import json
import threading

import numpy as np
import pytest

from stream_forecaster.config import load_config
from stream_forecaster.intervals import AdaptiveInterval, AnomalyBand
from stream_forecaster.metrics import Metrics
from stream_forecaster.pipeline import Pipeline, Stopped
from stream_forecaster.testing import FakeRecord, ListSink, StubForecaster

L = 6  # sequence_length: windows of 5 readings
START = np.datetime64("2007-03-01T00:00:00")
SENSORS = ("a", "b", "c")


def config(*overrides):
    return load_config(None, ["model.sequence_length=6", "data.features=[Global_active_power]",
                              "model.layers=[1, 8, 1]", "kafka.anomaly_topic=events", "kafka.health_topic=health",
                              *overrides], environ={})


def series(n=60, seed=3):
    """Per sensor, smooth readings of its own size: ``{sensor: [n] values}``."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return {s: 10.0 ** k * (5 + np.sin(t / 3 + k)) + 0.01 * rng.standard_normal(n) for k, s in enumerate(SENSORS)}


def records(values, missing=(), absent=()):
    """JSON readings, minute by minute across sensors; ``missing``: (sensor, minute) sent as '?', ``absent``: never
    sent."""
    out = []
    n = len(next(iter(values.values())))
    for minute in range(n):
        for sensor in SENSORS:
            if (sensor, minute) in absent:
                continue
            stamp = str(START + np.timedelta64(minute, "m"))
            value = "?" if (sensor, minute) in missing else float(values[sensor][minute])
            body = json.dumps({"timestamp": stamp, "value": value}).encode()
            out.append(FakeRecord("in", 0, len(out), sensor.encode(), body))
    return out


def band(width=6.0):
    """A fixed band of ``width`` window spreads either side of the forecast, scores in window spreads."""
    return AnomalyBand(AdaptiveInterval((0.005, 0.995), [-width], [width]), [1.0])


def run(batches, forecaster, *overrides, sink=None):
    metrics = Metrics(forecaster.targets)
    sink = sink if sink is not None else ListSink()
    pipeline = Pipeline(config(*overrides), forecaster, sink, metrics)
    for batch in batches:
        pipeline.process(batch)
    return pipeline, sink, metrics


def published(sink, topic):
    return [json.loads(r.value) for r in sink.records if r.topic == topic]


def test_an_injected_spike_is_one_anomaly_event_with_its_score_and_nothing_else_is():
    values = series()
    spike_at = 30
    clean = values["b"][spike_at]
    values["b"][spike_at] += 50 * values["b"].std()
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, anomaly_band=band())
    pipeline, sink, metrics = run([records(values)], forecaster)

    events = published(sink, "events")
    assert [e["type"] for e in events] == ["anomaly"], events
    event = events[0]
    window = values["b"][spike_at - (L - 1):spike_at].astype(np.float32).astype(np.float64)
    forecast, scale = window[-1], window.std()  # the stub forecasts the last reading (step 0)
    reading = float(np.float32(values["b"][spike_at]))
    spike_time = str(START + np.timedelta64(spike_at, "m"))
    assert event["sensor"] == "b" and event["timestamp"] == spike_time
    assert event["reading"] == pytest.approx(reading, rel=1e-6)
    assert event["forecast"] == pytest.approx(forecast, rel=1e-6)
    assert event["lower"] == pytest.approx(forecast - 6 * scale, rel=1e-5)
    assert event["upper"] == pytest.approx(forecast + 6 * scale, rel=1e-5)
    assert event["score"] == pytest.approx((reading - forecast) / scale, rel=1e-5)
    assert event["score"] > 6 and reading > clean
    # named as the forecast it disproves was
    forecast_ids = {json.loads(r.value)["id"] for r in sink.records if r.topic == pipeline.output_topic}
    assert event["id"] == f"b@{spike_time}" and event["id"] in forecast_ids
    assert event["model_version"] == "1" and event["source"]["offset"] == records(values)[3 * spike_at + 1].offset
    assert metrics.registry.get_sample_value("stream_forecaster_anomalies_total") == 1
    events_out = [r for r in sink.records if r.topic == "events"]
    assert events_out[0].key == b"b" and dict(events_out[0].headers)["event"] == b"anomaly"


def test_the_same_readings_in_any_batches_give_the_same_events():
    values = series()
    values["a"][20] -= 40 * values["a"].std()
    values["c"][45] += 40 * values["c"].std()
    stream = records(values)
    outcomes = []
    for size in (1, 7, len(stream)):
        forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, anomaly_band=band())
        _, sink, _ = run([stream[i:i + size] for i in range(0, len(stream), size)], forecaster)
        outcomes.append([(e["id"], round(e["score"], 3)) for e in published(sink, "events")])
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert [i for i, _ in outcomes[0]] == ["a@2007-03-01T00:20:00", "c@2007-03-01T00:45:00"]


def test_missing_readings_are_never_anomalies_and_a_run_of_them_is_one_gap_event():
    values = series()
    values["c"][43] += 0  # the reading after the gap: not scored, so never an anomaly, whatever it is
    missing = {("a", 12), ("c", 40), ("c", 41)}
    absent = {("c", 42)}  # lost: seen from the next reading's time, like a '?'
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, anomaly_band=band(1e-6))
    _, sink, metrics = run([records(values, missing, absent)], forecaster, "window.min_gap=2")

    gaps = [e for e in published(sink, "events") if e["type"] == "gap"]
    assert gaps == [{"type": "gap", "id": "c@2007-03-01T00:39:00/2007-03-01T00:43:00", "sensor": "c",
                     "from": "2007-03-01T00:39:00", "to": "2007-03-01T00:43:00", "missing": 3,
                     "source": gaps[0]["source"]}]
    assert metrics.registry.get_sample_value("stream_forecaster_gaps_total") == 1
    anomalies = {e["id"] for e in published(sink, "events") if e["type"] == "anomaly"}
    # a band of no width: every scored reading is outside it, and only scored readings
    scored = metrics.registry.get_sample_value("stream_forecaster_scored_predictions_total")
    assert len(anomalies) == scored
    assert not {"a@2007-03-01T00:12:00", "a@2007-03-01T00:13:00", "c@2007-03-01T00:43:00"} & anomalies


def test_gap_events_follow_window_min_gap():
    values = series()
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L)
    stream = records(values, missing={("a", 12)}, absent={("b", 30), ("b", 31)})
    for min_gap, expected in ((1, ["a", "b"]), (2, ["b"]), (3, []), (0, [])):
        _, sink, metrics = run([stream], forecaster, f"window.min_gap={min_gap}")
        assert [e["sensor"] for e in published(sink, "events")] == expected, min_gap
        assert metrics.registry.get_sample_value("stream_forecaster_gaps_total") == len(expected)


def test_events_are_counted_but_not_published_without_an_anomaly_topic():
    values = series()
    values["b"][30] += 50 * values["b"].std()
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, anomaly_band=band())
    _, sink, metrics = run([records(values, absent={("a", 5), ("a", 6)})], forecaster, "kafka.anomaly_topic=null")
    assert {r.topic for r in sink.records} == {"sensor-predictions"}
    assert metrics.registry.get_sample_value("stream_forecaster_anomalies_total") == 1
    assert metrics.registry.get_sample_value("stream_forecaster_gaps_total") == 1


class RefusingEvents(ListSink):
    """Acknowledges forecasts; stop is requested while the events are on their way."""

    def publish(self, records=(), stop=None):
        if any(r.topic == "events" for r in [*self.queued, *records]):
            stop.set()
            self.queued.clear()
            return False
        return super().publish(records, stop)


def test_a_batch_whose_events_are_not_acknowledged_is_not_committed():
    values = series()
    values["b"][30] += 50 * values["b"].std()
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, anomaly_band=band())
    pipeline = Pipeline(config(), forecaster, RefusingEvents(), Metrics(forecaster.targets), threading.Event())
    with pytest.raises(Stopped):
        pipeline.process(records(values))


def ewm(x, span):
    """pandas' ``Series.ewm(span=span).mean()`` of ``x``, last value (weights (1 - alpha)^age)."""
    weights = (1 - 2 / (span + 1)) ** np.arange(len(x))[::-1]
    return float((weights * x).sum() / weights.sum())


def test_health_records_hold_each_sensors_rolling_figures_computed_from_its_readings():
    values = series()
    step, span = 0.5, 7
    interval = AdaptiveInterval((0.1, 0.9), [-0.4], [0.4])
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, step=step, interval=interval)
    stream = records(values, absent={("a", 30)})
    pipeline, _, metrics = run([stream[:50], stream[50:]], forecaster, f"metrics.health_span={span}")
    health = {json.loads(r.value)["sensor"]: (r, json.loads(r.value)) for r in pipeline.health_report(1.7e9)}
    assert set(health) == set(SENSORS)
    skills = []
    for sensor in SENSORS:
        x = values[sensor].astype(np.float32).astype(np.float64)
        minutes = [m for m in range(len(x)) if not (sensor == "a" and m == 30)]
        errors, baseline, inside = [], [], []
        for k in range(L - 1, len(minutes)):
            t, window = minutes[k], x[minutes[k - L + 1:k]]
            if minutes[k] - minutes[k - 1] > 1:
                continue  # the forecast was for the minute that never came: not scored
            scale = window.std()
            forecast = np.float32(window[-1] + step * scale)
            errors.append(forecast - x[t])
            baseline.append(window[-1] - x[t])
            inside.append(forecast - 0.4 * scale <= x[t] <= forecast + 0.4 * scale)
        errors, baseline = np.array(errors), np.array(baseline)
        record, got = health[sensor]
        assert record.key == sensor.encode() and record.topic == "health"
        assert got["scored"] == len(errors)
        assert got["mae"] == pytest.approx(ewm(np.abs(errors), span), rel=1e-4)
        rmse, persistence_rmse = np.sqrt(ewm(errors ** 2, span)), np.sqrt(ewm(baseline ** 2, span))
        assert got["rmse"] == pytest.approx(rmse, rel=1e-4)
        assert got["persistence_mae"] == pytest.approx(ewm(np.abs(baseline), span), rel=1e-4)
        assert got["persistence_rmse"] == pytest.approx(persistence_rmse, rel=1e-4)
        assert got["skill"] == pytest.approx(1 - rmse / persistence_rmse, rel=1e-3, abs=1e-6)
        assert got["coverage"] == pytest.approx(ewm(np.array(inside, float), span), rel=1e-4, abs=1e-9)
        assert got["last_reading"] == str(START + np.timedelta64(minutes[-1], "m"))
        assert got["model_version"] == "1" and got["at"] == "2023-11-14T22:13:20Z"
        skills.append(got["skill"])
    assert metrics.registry.get_sample_value("stream_forecaster_health_sensors") == 3
    assert metrics.registry.get_sample_value("stream_forecaster_sensors_worse_than_persistence_ratio") == \
        pytest.approx(np.mean(np.array(skills) < 0))
    assert metrics.registry.get_sample_value("stream_forecaster_sensor_skill", {"quantile": "0.1"}) == \
        pytest.approx(np.quantile(skills, 0.1), rel=1e-3)
    assert metrics.registry.get_sample_value("stream_forecaster_health_records_total") == 3


def test_health_is_the_same_whatever_the_batches_and_forgets_evicted_sensors():
    values = series()
    stream = records(values)
    reports = []
    for size in (1, 13, len(stream)):
        forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, step=0.3)
        pipeline, _, _ = run([stream[i:i + size] for i in range(0, len(stream), size)], forecaster)
        reports.append({json.loads(r.value)["sensor"]: json.loads(r.value) for r in pipeline.health_report(0)})
    for sensor in SENSORS:
        for name in ("mae", "rmse", "persistence_mae", "persistence_rmse", "skill", "scored"):
            assert reports[0][sensor][name] == pytest.approx(reports[1][sensor][name], rel=1e-9)
            assert reports[0][sensor][name] == pytest.approx(reports[2][sensor][name], rel=1e-9)
    assert reports[0]["a"]["coverage"] is None  # no interval published
    pipeline.evict_before(0, stream[-1].offset)  # every sensor but the last one read
    assert [json.loads(r.value)["sensor"] for r in pipeline.health_report(0)] == [SENSORS[-1]]


def test_without_a_health_topic_only_the_gauges_are_updated():
    forecaster = StubForecaster(["Global_active_power"], ["Global_active_power"], L, step=0.3)
    pipeline, _, metrics = run([records(series())], forecaster, "kafka.health_topic=null")
    assert pipeline.health_report(0) == []
    assert metrics.registry.get_sample_value("stream_forecaster_health_sensors") == 3


class Trend(StubForecaster):
    """Extrapolates the last step: on smooth readings it beats persistence, which the shadow needs to see."""

    def forecast_scaled(self, windows):
        last, scale = super().forecast_scaled(windows)
        return (2 * windows[:, -1, self._last] - windows[:, -2, self._last]).astype(np.float32), scale


def shadow_run(candidate, *overrides):
    values = series(120)
    serving = StubForecaster(["Global_active_power"], ["Global_active_power"], L, step=0.5)
    metrics = Metrics(serving.targets)
    pipeline = Pipeline(config("retrain.shadow_sample=0.5", *overrides), serving, ListSink(), metrics)
    pipeline.set_candidate(candidate)
    stream = records(values)
    for i in range(0, len(stream), 50):
        pipeline.process(stream[i:i + 50])
    return pipeline, metrics, values


def test_the_candidate_forecasts_its_sample_in_shadow_scored_on_the_same_readings_and_never_published():
    candidate = Trend(["Global_active_power"], ["Global_active_power"], L, version="2")
    pipeline, metrics, values = shadow_run(candidate, "retrain.shadow_for=100000")
    from stream_forecaster.shadow import in_sample

    sampled = [s for s, picked in zip(SENSORS, in_sample(SENSORS, 0.5)) if picked]
    assert 0 < len(sampled) < len(SENSORS)  # the sample, by the sensors' ids, holds some sensors and not others
    assert candidate.windows_seen == len(sampled) * (120 - (L - 1) + 1)
    assert {json.loads(r.value)["model_version"] for r in pipeline.sink.records} == {"1"}
    errors = {"candidate": [], "serving": [], "persistence": []}
    for sensor in sampled:
        x = values[sensor].astype(np.float32).astype(np.float64)
        for t in range(L - 1, 120):
            window = x[t - (L - 1):t]
            errors["candidate"].append(np.float32(2 * window[-1] - window[-2]) - x[t])
            errors["serving"].append(np.float32(window[-1] + 0.5 * window.std()) - x[t])
            errors["persistence"].append(window[-1] - x[t])
    shadow = pipeline.shadow
    assert shadow.scored == len(errors["candidate"])
    rmse = [np.sqrt(np.mean(np.square(errors[k]))) for k in ("candidate", "serving", "persistence")]
    np.testing.assert_allclose(shadow.figures(), rmse, rtol=1e-5)
    assert metrics.registry.get_sample_value("stream_forecaster_shadow_scored_predictions_total") == shadow.scored
    assert metrics.registry.get_sample_value("stream_forecaster_rolling_rmse",
                                             {"target": "Global_active_power", "forecaster": "candidate"}) > 0
    assert shadow.verdict() is None  # fewer than retrain.shadow_for
    pipeline.set_candidate(None)
    assert np.isnan(metrics.registry.get_sample_value(
        "stream_forecaster_rolling_rmse", {"target": "Global_active_power", "forecaster": "candidate"}))


@pytest.mark.parametrize("candidate, verdict", [
    (Trend(["Global_active_power"], ["Global_active_power"], L, version="2"), "promoted"),
    (StubForecaster(["Global_active_power"], ["Global_active_power"], L, version="2", step=1.0), "dropped"),
    (StubForecaster(["Global_active_power"], ["Global_active_power"], L, version="2", step=0.0), "dropped"),
])
def test_the_verdict_needs_shadow_for_forecasts_and_a_win_over_both(candidate, verdict):
    # the third is persistence itself: it beats the serving model but does not beat persistence
    pipeline, _, _ = shadow_run(candidate, "retrain.shadow_for=60")
    assert pipeline.shadow.scored >= 60 and pipeline.shadow.verdict() == verdict
