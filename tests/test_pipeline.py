"""The pipeline on in-memory records: exact counts, same numbers as offline, honest scores."""

import json
import threading

import numpy as np
import pytest
from conftest import make_forecaster, offline_forecasts, sample_lines

from stream_forecaster.config import load_config
from stream_forecaster.messages import MAX_KEY_BYTES, UciLineParser
from stream_forecaster.metrics import Metrics
from stream_forecaster.pipeline import HEADER_BUDGET, Pipeline, Stopped
from stream_forecaster.store import ModelMetadata
from stream_forecaster.testing import FakeRecord, ListSink

L = 6


def config(*overrides):
    return load_config(None, ["model.sequence_length=6", "data.features=[Global_active_power]",
                              "model.layers=[1, 8, 1]", "metrics.rolling_window=1000", *overrides], environ={})


def build(*overrides, sink=None, forecaster=None):
    forecaster = forecaster or make_forecaster(sequence_length=L)
    metrics = Metrics(forecaster.targets)
    sink = sink if sink is not None else ListSink()
    return Pipeline(config(*overrides), forecaster, sink, metrics), sink, metrics


def value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None)


def stream(sensors=("a", "b", "c"), n=40):
    """Interleaved UCI lines of the real sample, with '?' and garbage mixed in; returns records and truth."""
    records, accepted = [], {s: [] for s in sensors}
    for k, sensor in enumerate(sensors):
        for j, line in enumerate(sample_lines(n, start=1000 * k)):
            if j % 11 == 5:
                line = line.split(";", 2)[0] + ";" + line.split(";", 2)[1] + ";?;?;?;?;?;?;"
            elif j % 13 == 7:
                line = "garbage;" + line
            else:
                accepted[sensor].append(line)
            records.append((j, sensor, line))
    records.sort()  # interleave the sensors minute by minute
    out = [FakeRecord("in", hash(s) % 3, i, s.encode(), line.encode(), timestamp=0)
           for i, (_, s, line) in enumerate(records)]
    return out, accepted


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_every_full_window_gives_one_prediction_equal_to_offline(batch):
    pipeline, sink, metrics = build()
    records, accepted = stream()
    for i in range(0, len(records), batch):
        pipeline.process(records[i:i + batch])
    by_sensor = {}
    for r in sink.records:
        by_sensor.setdefault(r.key.decode(), []).append(json.loads(r.value))
    for sensor, lines in accepted.items():
        got = by_sensor[sensor]
        assert len(got) == len(lines) - (L - 1) + 1
        values, expected = offline_forecasts(pipeline.forecaster, lines)
        np.testing.assert_allclose([g["prediction"] for g in got], expected[:, 0], rtol=1e-5, atol=1e-6)
        # each prediction is stamped with the minute after the last reading of its window
        first = UciLineParser(["Global_active_power"]).parse(lines[L - 2])[0]
        assert got[0]["timestamp"] == np.datetime64(first + 60, "s").astype(str)
        assert all(g["model_version"] == "1" and g["sensor"] == sensor for g in got)
    n_missing = sum(1 for r in records if b";?;" in r.value)
    n_invalid = sum(1 for r in records if r.value.startswith(b"garbage"))
    assert value(metrics, "stream_forecaster_readings_total", outcome="missing") == n_missing
    assert value(metrics, "stream_forecaster_readings_total", outcome="invalid") == n_invalid
    assert value(metrics, "stream_forecaster_readings_total", outcome="accepted") == sum(map(len, accepted.values()))
    assert value(metrics, "stream_forecaster_predictions_total") == len(sink.records)
    assert value(metrics, "stream_forecaster_active_sensors") == 3


def test_scores_each_prediction_when_its_truth_arrives():
    pipeline, sink, metrics = build()
    records, accepted = stream(sensors=("a",), n=60)
    pipeline.process(records[:25])
    pipeline.process(records[25:])
    values, predicted = offline_forecasts(pipeline.forecaster, accepted["a"])
    # prediction k (after reading k + L - 2) is scored by reading k + L - 1, if that came a minute later (not after
    # a '?' or an invalid message: the prediction was for the minute in between); the last one is still pending
    stamps = np.array([UciLineParser(["Global_active_power"]).parse(line)[0] for line in accepted["a"]])
    next_minute = stamps[L - 1:] - stamps[L - 2:-1] == 60
    assert 0 < next_minute.sum() < len(next_minute)  # both kinds occur
    truth, last = values[L - 1:, 0][next_minute], values[L - 2:-1, 0][next_minute]
    model_err, base_err = predicted[:-1, 0][next_minute] - truth, last - truth
    assert value(metrics, "stream_forecaster_scored_predictions_total") == len(truth)
    assert value(metrics, "stream_forecaster_rolling_mae", target="Global_active_power", forecaster="model") == \
        pytest.approx(np.abs(model_err).mean(), rel=1e-5)
    assert value(metrics, "stream_forecaster_rolling_rmse", target="Global_active_power", forecaster="persistence") == \
        pytest.approx(np.sqrt(np.square(base_err).mean()), rel=1e-5)
    assert value(metrics, "stream_forecaster_prediction_abs_error_count", target="Global_active_power") == len(truth)


def test_a_huge_key_or_headers_make_a_message_invalid_and_its_dead_letter_stays_sendable():
    pipeline, sink, metrics = build("kafka.dead_letter_topic=dead")
    line = sample_lines(1)[0].encode()
    huge_key = b"k" * 350_000
    many_headers = [(f"h{i}", b"v" * 1000) for i in range(1000)]  # about 1 MB of headers
    pipeline.process([FakeRecord("in", 0, 0, huge_key, line), FakeRecord("in", 0, 1, b"s", b"x", headers=many_headers)])
    assert value(metrics, "stream_forecaster_readings_total", outcome="invalid") == 2 and len(pipeline.windows) == 0
    by_key, by_headers = sink.records
    assert "key of 350000 bytes" in dict(by_key.headers)["error"].decode()
    assert by_key.key == huge_key[:MAX_KEY_BYTES] and dict(by_key.headers)["key_truncated"] == b"350000"
    kept = [h for h in by_headers.headers if h[0][0] == "h" and h[0][1:].isdigit()]
    assert kept == many_headers[:len(kept)] and 0 < sum(len(k) + len(v) for k, v in kept) <= HEADER_BUDGET
    assert dict(by_headers.headers)["headers_dropped"] == str(1000 - len(kept)).encode()
    for r in sink.records:  # what the producer's max_request_size (max_message_bytes + 64 KiB at least) takes
        assert len(r.key) + len(r.value) + sum(len(k) + len(v) for k, v in r.headers) < 65536 + 65536


def test_a_dead_letter_carries_a_bounded_number_of_headers_even_when_they_are_empty():
    pipeline, sink, _ = build("kafka.dead_letter_topic=dead")
    empty = [(f"h{i}", b"") for i in range(200_000)]  # no bytes of their own, but a few each on the wire
    pipeline.process([FakeRecord("in", 0, 0, b"s", b"x", headers=empty)])
    (dead,) = sink.records
    assert len(dead.headers) < HEADER_BUDGET // 10 + 10
    assert dict(dead.headers)["headers_dropped"] == str(200_000 - (len(dead.headers) - 3)).encode()


def test_rolling_window_keeps_only_the_last_scores():
    pipeline, sink, metrics = build("metrics.rolling_window=5")
    records, accepted = stream(sensors=("a",), n=60)
    pipeline.process(records)
    values, predicted = offline_forecasts(pipeline.forecaster, accepted["a"])
    truth = values[L - 1:, 0]
    assert value(metrics, "stream_forecaster_rolling_mae", target="Global_active_power", forecaster="model") == \
        pytest.approx(np.abs(predicted[:-1, 0] - truth)[-5:].mean(), rel=1e-5)


def test_offsets_to_commit_cover_every_record_of_the_batch():
    pipeline, sink, _ = build()
    records = [FakeRecord("in", p, o, b"s", b"?") for p, o in [(0, 5), (1, 9), (0, 6), (1, 10), (2, 3)]]
    assert pipeline.process(records) == {("in", 0): 7, ("in", 1): 11, ("in", 2): 4}


def test_invalid_messages_go_to_the_dead_letter_topic_with_the_reason():
    pipeline, sink, metrics = build("kafka.dead_letter_topic=dead")
    bad = [b"\xff\xfe", b"nan", b"1;2;3", b"", b"x" * 70000, b'{"value": "high"}', b"31/2/2007;10:00:00;1;2;3;4;5;6;7"]
    # a header without a value (null, as a Java producer may send) goes on empty: kafka-python sends no null
    records = [FakeRecord("in", 0, i, b"s1", v, headers=[("trace", b"t1"), ("empty", None)]) for i, v in enumerate(bad)]
    assert pipeline.process(records) == {("in", 0): len(bad)}
    assert [r.topic for r in sink.records] == ["dead"] * len(bad)
    # the oversized one is cut to kafka.max_message_bytes, so no broker refuses it; the whole stays at its source
    assert [r.value for r in sink.records] == [v[:65536] for v in bad]
    assert [dict(r.headers).get("truncated") for r in sink.records] == [None] * 4 + [b"70000"] + [None] * 2
    assert all(dict(r.headers)["empty"] == b"" for r in sink.records)
    reasons = [dict(r.headers)["error"].decode() for r in sink.records]
    for reason, fragment in zip(reasons, ["not UTF-8", "non-finite", "expected 9 fields", "empty", "oversized",
                                          "must be a number", "bad date"]):
        assert fragment in reason
    assert dict(sink.records[0].headers)["trace"] == b"t1"
    assert dict(sink.records[0].headers)["source"] == b"in/0/0"
    assert value(metrics, "stream_forecaster_dead_letters_total") == len(bad)


def test_json_and_bare_number_inputs():
    pipeline, sink, _ = build()
    values = [0.5, 1.5, 2.5, 1.0, 0.7, 0.9, 1.1]
    records = []
    for i, v in enumerate(values):
        if i % 2:
            payload = json.dumps({"timestamp": f"2024-03-01T10:{i:02d}:00+00:00", "values": {"Global_active_power": v}})
        else:
            payload = str(v)
        records.append(FakeRecord("in", 0, i, None, payload.encode()))
    pipeline.process(records)
    got = [json.loads(r.value) for r in sink.records]
    assert len(got) == len(values) - (L - 1) + 1
    assert got[0]["sensor"] == "default"
    assert got[0]["timestamp"] is None  # the window ends with a bare number: no time
    assert got[1]["timestamp"] == "2024-03-01T10:06:00Z"  # last reading 10:05 (zoned) + 1 minute
    window = np.array(values[1:6], dtype=np.float32).reshape(1, 5, 1)
    assert got[1]["prediction"] == pytest.approx(float(pipeline.forecaster.forecast(window)[0, 0]), rel=1e-5)


def test_multi_target_prediction_is_an_object_per_target():
    forecaster = make_forecaster(features=("Global_active_power", "Voltage"),
                                 targets=("Global_active_power", "Sub_metering_3"), sequence_length=L)
    pipeline, sink, _ = build("data.features=[Global_active_power, Voltage]",
                              "data.targets=[Global_active_power, Sub_metering_3]", "model.layers=[2, 8, 2]",
                              "model.predict=level", "data.normalization=standardize",
                              forecaster=forecaster)
    records = [FakeRecord("in", 0, i, b"h", line.encode()) for i, line in enumerate(sample_lines(10))]
    pipeline.process(records)
    got = [json.loads(r.value) for r in sink.records]
    assert len(got) == 10 - (L - 1) + 1
    assert set(got[0]["prediction"]) == {"Global_active_power", "Sub_metering_3"}


def test_failed_publish_is_retried_and_a_stop_during_retries_commits_nothing():
    sink = ListSink(failures=2)
    pipeline, sink, _ = build(sink=sink)
    records = [FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(sample_lines(8))]
    assert pipeline.process(records) == {("in", 0): 8}
    assert sink.attempts == 3 and len(sink.records) == 8 - (L - 1) + 1

    stopped = threading.Event()
    stopped.set()
    pipeline, sink, _ = build(sink=ListSink(failures=1))
    pipeline.stop = stopped
    with pytest.raises(Stopped):
        pipeline.process(records)


def test_a_refill_makes_the_live_paths_decisions_evictions_included():
    """Readings with producer clocks all over the place, one sensor evicted midway: a refill from the same
    readings, told where the eviction was, ends with the same windows and the same pending forecasts."""
    lines = sample_lines(4 * L)
    day_ms = 86_400_000

    def record(offset, key, j, skew_ms):
        return FakeRecord("in", 0, offset, key, lines[j].encode(), timestamp=1_700_000_000_000 + skew_ms)

    # "behind" sends with a clock 3 days slow, "ahead" jumps 2 days forward midway, "gap" goes quiet
    first = [record(i, k, i // 3, s) for i, (k, s) in
             enumerate([(b"behind", -3 * day_ms), (b"ahead", 0), (b"gap", 0)] * L)]
    second = [record(len(first) + i, k, L + i // 2, s) for i, (k, s) in
              enumerate([(b"behind", -3 * day_ms), (b"ahead", 2 * day_ms)] * L)]
    third = [record(len(first) + len(second) + i, b"gap", 2 * L + i, 0) for i in range(L - 2)]
    live, _, _ = build()
    live.process(first)
    live.process(second)
    assert live.evict_before(0, len(first)) == 1  # "gap" was last read in the first batch
    live.process(third)
    refilled, _, _ = build()
    replayed = refilled.refill(0, iter(first + second + third), [(len(first) + len(second), len(first))])
    assert replayed == len(first) + len(second) + len(third)
    assert set(refilled.windows.slots) == set(live.windows.slots) == {"behind", "ahead", "gap"}
    for sensor in ("behind", "ahead", "gap"):
        np.testing.assert_array_equal(refilled.windows.window(refilled.windows.slots[sensor]),
                                      live.windows.window(live.windows.slots[sensor]))
    slots = [live.windows.slots[s] for s in ("behind", "ahead", "gap")]
    live_pending = live.pending.take(np.array(slots))
    live.pending.put(np.array(slots), *live_pending)
    refilled_pending = refilled.pending.take(np.array([refilled.windows.slots[s] for s in ("behind", "ahead", "gap")]))
    # forecast, persistence, interval and scale of the two full windows; "gap"'s window is not full: none
    np.testing.assert_array_equal(np.stack(refilled_pending)[:, :2], np.stack(live_pending)[:, :2])
    assert np.isfinite(live_pending[0][:2]).all() and np.isnan(live_pending[0][2]) and np.isnan(refilled_pending[0][2])


def test_windows_know_where_a_refill_of_each_partition_must_start():
    pipeline, _, _ = build()
    lines = [line.encode() for line in sample_lines(3 * L)]
    # partition 0: "a" fills its window and moves on, "b" has two readings; partition 1: "c" has one
    records = ([FakeRecord("in", 0, 10 + i, b"a", lines[i]) for i in range(L + 3)]
               + [FakeRecord("in", 0, 40 + i, b"b", lines[i]) for i in range(2)]
               + [FakeRecord("in", 1, 7, b"c", lines[0])])
    pipeline.process(records)
    # "a" holds its last L - 1 readings (offsets 14-18); "b" holds 40-41; "c", 7
    assert pipeline.windows.refill_starts() == {0: 10 + (L + 3) - (L - 1), 1: 7}
    pipeline.evict_before(0, 19)  # "a" was last read at offset 18
    assert pipeline.windows.refill_starts() == {0: 40, 1: 7}


def test_a_repeated_or_late_reading_is_skipped_counted_and_forecasts_stay_as_without_it():
    lines = [line.encode() for line in sample_lines(L + 2)]
    clean, clean_sink, clean_metrics = build()
    clean.process([FakeRecord("in", 0, i, b"s", line) for i, line in enumerate(lines)])
    pipeline, sink, metrics = build()
    # at-least-once upstream: reading L - 1 delivered twice, reading 2 again late
    order = [*range(L), L - 1, 2, L, L + 1]
    pipeline.process([FakeRecord("in", 0, k, b"s", lines[i]) for k, i in enumerate(order)])
    assert value(metrics, "stream_forecaster_readings_total", outcome="stale") == 2
    assert value(metrics, "stream_forecaster_readings_total", outcome="accepted") == len(lines)
    assert [json.loads(r.value)["prediction"] for r in sink.records] == \
        [json.loads(r.value)["prediction"] for r in clean_sink.records]
    assert len({json.loads(r.value)["id"] for r in sink.records}) == len(sink.records) == 4
    for name in ("stream_forecaster_scored_predictions_total", "stream_forecaster_prediction_abs_error_sum"):
        labels = {"target": "Global_active_power"} if "abs_error" in name else {}
        assert value(metrics, name, **labels) == value(clean_metrics, name, **labels)


def test_sensors_arriving_by_the_thousand_grow_the_windows_mid_batch():
    pipeline, sink, metrics = build()
    keys = [f"s{i}".encode() for i in range(3000)]  # past the first 1,024 slots within one chunk
    for minute, line in enumerate(sample_lines(2)):
        pipeline.process([FakeRecord("in", 0, minute * 3000 + i, k, line.encode()) for i, k in enumerate(keys)])
    assert value(metrics, "stream_forecaster_readings_total", outcome="accepted") == 6000
    assert value(metrics, "stream_forecaster_readings_total", outcome="stale") == 0


def test_a_forecast_for_a_minute_without_a_reading_is_not_scored():
    pipeline, sink, metrics = build()
    lines = sample_lines(L + 2)
    skipped = ";".join(lines[L - 1].split(";")[:2] + ["?"] * 7)  # the minute the first forecast is for
    values = [*lines[:L - 1], skipped, *lines[L:]]
    pipeline.process([FakeRecord("in", 0, i, b"s", line.encode()) for i, line in enumerate(values)])
    assert len(sink.records) == 3
    # the forecast for the '?' minute is not scored against the reading after it; the next one is
    assert value(metrics, "stream_forecaster_scored_predictions_total") == 1


def test_a_reading_without_a_kafka_timestamp_is_forecast_but_not_timed():
    pipeline, sink, metrics = build()
    pipeline.process([FakeRecord("in", 0, i, b"s", line.encode(), timestamp=-1)
                      for i, line in enumerate(sample_lines(L))])
    assert len(sink.records) == 2
    assert value(metrics, "stream_forecaster_reading_to_published_seconds_count") == 0


def test_scores_of_readings_at_float32s_edge_stay_finite():
    forecaster = make_forecaster(sequence_length=2)
    pipeline = Pipeline(load_config(None, ["model.sequence_length=2", "data.features=[Global_active_power]",
                                           "model.layers=[1, 8, 1]"], environ={}), forecaster, ListSink(),
                        Metrics(forecaster.targets))
    values = [b"3e38", b"-3e38", b"1.0", b"1.0"]  # persistence's error 6e38 exceeds float32, not float64
    pipeline.process([FakeRecord("in", 0, i, b"s", v) for i, v in enumerate(values)])
    rmse = pipeline.metrics.registry.get_sample_value(
        "stream_forecaster_rolling_rmse", {"target": "Global_active_power", "forecaster": "persistence"})
    assert rmse is not None and np.isfinite(rmse) and rmse > 1e38


def test_idle_sensors_lose_their_window_and_come_back_empty():
    pipeline, sink, metrics = build()
    lines = sample_lines(12)
    pipeline.process([FakeRecord("in", 0, i, b"old", line.encode()) for i, line in enumerate(lines[:8])])
    pipeline.process([FakeRecord("in", 0, 8, b"new", lines[0].encode())])
    assert pipeline.evict_before(0, 8) == 1  # "old" was last read at offset 7, "new" at 8
    assert set(pipeline.windows.slots) == {"new"}
    assert value(metrics, "stream_forecaster_evicted_sensors_total") == 1
    assert value(metrics, "stream_forecaster_active_sensors") == 1
    before = len(sink.records)
    # "old" returns: its window starts empty, so 4 readings give no forecast and the freed slot is reused
    pipeline.process([FakeRecord("in", 0, 9 + i, b"old", line.encode()) for i, line in enumerate(lines[8:12])])
    assert len(sink.records) == before
    assert pipeline.windows.slots["old"] == 0


def test_intervals_are_published_and_their_live_coverage_counts_the_truths_inside():
    forecaster = make_forecaster(sequence_length=L).with_metadata(
        intervals={"quantiles": [0.1, 0.9], "lower": [-0.3], "upper": [0.2]})
    pipeline, sink, metrics = build(forecaster=forecaster)
    records, accepted = stream(n=60)
    for i in range(0, len(records), 25):
        pipeline.process(records[i:i + 25])
    published = {}
    for r in sink.records:
        p = json.loads(r.value)
        assert p["lower"] == pytest.approx(p["prediction"] - 0.3, abs=1e-6)
        assert p["upper"] == pytest.approx(p["prediction"] + 0.2, abs=1e-6)
        published.setdefault(p["sensor"], []).append(p)
    # recount from the truth: the k-th forecast of a sensor is scored by its (k + L - 1)-th accepted reading
    # (if it came a minute later)
    parser, inside = UciLineParser(["Global_active_power"]), []
    for sensor, lines in accepted.items():
        truths = [parser.parse(line) for line in lines]
        for k, p in enumerate(published[sensor]):
            if k + L - 1 < len(truths) and truths[k + L - 1][0] - truths[k + L - 2][0] == 60:
                inside.append(p["lower"] <= truths[k + L - 1][1][0] <= p["upper"])
    assert inside and value(metrics, "stream_forecaster_rolling_interval_coverage",
                            target="Global_active_power") == pytest.approx(np.mean(inside))


def test_the_live_coverage_steers_the_intervals_the_next_forecasts_publish():
    from stream_forecaster.model import Forecaster, build_model

    spec = config("model.layers=null", "model.units=[8]")
    meta = {"features": ["Global_active_power"], "targets": ["Global_active_power"], "sequence_length": L,
            "predict": "change", "normalization": {"method": "window"}, "scaled_units": True,
            # far too narrow, as a model calibrated on a quieter month would be
            "intervals": {"quantiles": [0.1, 0.9], "lower": [-0.01], "upper": [0.01], "adaptation": 0.05}}
    forecaster = Forecaster(build_model(spec.model, spec.layers()), ModelMetadata.from_dict(meta), "1")
    pipeline, sink, metrics = build(forecaster=forecaster)
    records, accepted = stream(n=240)
    for i in range(0, len(records), 25):
        pipeline.process(records[i:i + 25])
    assert forecaster.prediction_interval.lower[0] < -0.2 and forecaster.prediction_interval.upper[0] > 0.2
    parser, inside = UciLineParser(["Global_active_power"]), []
    for sensor, lines in accepted.items():
        truths = [parser.parse(line) for line in lines]
        published = [json.loads(r.value) for r in sink.records if r.key == sensor.encode()]
        for k, p in enumerate(published):
            if k + L - 1 < len(truths) and truths[k + L - 1][0] - truths[k + L - 2][0] == 60:
                truth = np.float32(truths[k + L - 1][1][0])  # as the daemon holds it
                inside.append((k, np.float32(p["lower"]) <= truth <= np.float32(p["upper"])))
    early = np.mean([ok for k, ok in inside if k < 20])
    late = np.mean([ok for k, ok in inside if k >= 100])
    assert early < 0.5 and abs(late - 0.8) < abs(early - 0.8)
    assert value(metrics, "stream_forecaster_rolling_interval_coverage",
                 target="Global_active_power") == pytest.approx(np.mean([ok for _, ok in inside]))


def test_after_a_swap_the_old_models_pending_intervals_do_not_steer_the_new_ones():
    from stream_forecaster.model import Forecaster

    records, _ = stream(n=40)
    forecaster = make_forecaster(sequence_length=L).with_metadata(
        intervals={"quantiles": [0.1, 0.9], "lower": [-0.001], "upper": [0.001], "adaptation": 0.05})
    old = Forecaster(forecaster.model, forecaster.metadata, "1")
    pipeline, _, metrics = build(forecaster=old)
    pipeline.process(records[:57])  # minute 18 of each sensor; minute 19 is a valid reading of each
    new = Forecaster(forecaster.model, forecaster.metadata, "2")
    pipeline.swap_model(new)
    before = value(metrics, "stream_forecaster_rolling_interval_coverage", target="Global_active_power")
    scored = value(metrics, "stream_forecaster_scored_predictions_total")
    pipeline.process(records[57:60])  # each scores a forecast of the old model
    assert value(metrics, "stream_forecaster_scored_predictions_total") == scored + 3
    assert (new.prediction_interval.lower, new.prediction_interval.upper) == (pytest.approx(-0.001 / 0.8),
                                                                              pytest.approx(0.001 / 0.8))
    assert value(metrics, "stream_forecaster_rolling_interval_coverage", target="Global_active_power") == before
