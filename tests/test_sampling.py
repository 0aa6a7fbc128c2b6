"""The training sample: every window up to model.max_windows, past it a sample across sensors and time."""

from __future__ import annotations

import numpy as np

from stream_forecaster.config import load_config
from stream_forecaster.files import Series
from stream_forecaster.training import _day_before, _rows_of, _shares, backtest, choose_windows, train
from stream_forecaster.window import split_windows

# sensors of very different lengths, one too short for a single window of 10
LENGTHS = (5, 40, 300, 1200, 3000)
SEGMENTS = tuple(int(s) for s in np.cumsum((0, *LENGTHS[:-1])))
ROWS = sum(LENGTHS)


def choose(max_windows, seed=7, segments=SEGMENTS, rows=ROWS, length=10, train_fraction=0.9, validation=0.05):
    return choose_windows(segments, rows, length, train_fraction, validation, max_windows, seed)


def sensor_of(starts, segments=SEGMENTS):
    return np.searchsorted(segments, starts, side="right") - 1


def test_without_a_budget_or_within_it_every_window_is_taken_as_split_windows_gives_them():
    expected = split_windows(SEGMENTS, ROWS, 10, 0.9, 0.05)
    # the held-out slice's share of a budget is a ninth of it here (data.train_split 0.9)
    within = max(len(expected[0]) + len(expected[1]), 9 * len(expected[2]) + 1)
    for budget in (0, 10_000_000, within):
        chosen = choose(budget)
        assert not chosen.sampled
        for got, want in zip((chosen.train, chosen.validation, chosen.test), expected):
            assert np.array_equal(got, want)
        assert chosen.available == {"train": len(expected[0]), "validation": len(expected[1]), "test": len(expected[2])}


def test_a_budget_smaller_than_the_windows_is_a_sample_of_every_sensor_within_its_own_split():
    chosen = choose(500)
    train, validation, test = split_windows(SEGMENTS, ROWS, 10, 0.9, 0.05)
    assert chosen.sampled and len(chosen.train) + len(chosen.validation) == 500
    assert len(chosen.test) <= np.ceil(500 * 0.1 / 0.9)
    for part, whole in ((chosen.train, train), (chosen.validation, validation), (chosen.test, test)):
        assert np.isin(part, whole).all()  # a training window stays a training window, and so on
        assert (np.diff(part) > 0).all()  # distinct, sensor after sensor, each sensor's in time order
    for part in (chosen.train, chosen.test):
        assert set(sensor_of(part)) == {1, 2, 3, 4}  # all but the sensor too short for a window
    # equal shares, capped: sensor 1 (40 readings) gives all its 27 training and validation windows, the rest share
    per_sensor = np.bincount(sensor_of(np.concatenate([chosen.train, chosen.validation])), minlength=5)
    assert per_sensor[1] == int(31 * 0.9) and max(per_sensor[2:]) - min(per_sensor[2:]) <= 1
    # validation keeps its share of each sensor's sample, and comes after its training windows
    big = sensor_of(chosen.validation) == 4
    assert np.sum(big) == int(per_sensor[4] * 0.05)
    assert chosen.validation[big].min() > chosen.train[sensor_of(chosen.train) == 4].max()


def test_the_sample_spreads_over_each_sensors_time_and_is_deterministic_for_a_seed():
    chosen = choose(500)
    big = chosen.train[sensor_of(chosen.train) == 4] - SEGMENTS[4]
    span = int((3000 - 9) * 0.9) - int(int((3000 - 9) * 0.9) * 0.05)  # the sensor's training windows
    stratum = span / len(big)
    assert big.min() < stratum and big.max() >= span - stratum  # from the oldest stretch to the newest
    assert np.diff(big).max() < 2 * stratum + 1  # one window in each stratum: no long gap
    again, other = choose(500), choose(500, seed=8)
    for part in ("train", "validation", "test"):
        assert np.array_equal(getattr(chosen, part), getattr(again, part))
    assert not np.array_equal(chosen.train, other.train)


def test_the_held_out_slice_is_sampled_per_sensor_to_its_share_of_the_budget():
    chosen = choose(180)
    budget = int(np.ceil(180 * (1 - 0.9) / 0.9))
    assert len(chosen.test) == budget == 20
    counts = np.bincount(sensor_of(chosen.test), minlength=5)
    # sensor 1 has 4 held-out windows and gives them all; the others share the rest equally
    assert counts[0] == 0 and counts[1] == 4 and sorted(counts[2:]) == [5, 5, 6]
    _, _, test = split_windows(SEGMENTS, ROWS, 10, 0.9, 0.05)
    assert np.isin(chosen.test, test).all() and (np.diff(chosen.test) > 0).all()
    # the test sample has its own random stream: another training budget leaves it as it is
    assert np.array_equal(choose(181).test, choose(182).test)


def test_only_an_oversized_part_is_sampled():
    train, validation, test = split_windows(SEGMENTS, ROWS, 10, 0.9, 0.05)
    # each sensor's split rounds its training windows down: the held-out ones pass a ninth of the budget
    budget = len(train) + len(validation)
    chosen = choose(budget)
    assert np.array_equal(chosen.train, train) and np.array_equal(chosen.validation, validation)
    assert chosen.sampled and len(chosen.test) == int(np.ceil(budget / 9)) < len(test)


def test_shares_fill_equally_capped_and_give_the_remainder_at_random():
    rng = np.random.default_rng(0)
    capacity = np.array([0, 3, 100, 7, 100, 100])
    shares = _shares(capacity, 50, rng)
    assert shares.sum() == 50 and (shares <= capacity).all()
    assert shares[:2].tolist() == [0, 3] and shares[3] == 7
    assert sorted(shares[[2, 4, 5]].tolist()) == [13, 13, 14]
    fewer = _shares(capacity, 2, rng)  # fewer windows than sensors: two sensors, one window each
    assert fewer.sum() == 2 and set(fewer.tolist()) == {0, 1}
    assert np.array_equal(_shares(capacity, 1000, rng), capacity)


def test_rows_of_marks_the_rows_of_every_window():
    rng = np.random.default_rng(3)
    for n_rows, length in ((1, 1), (50, 1), (200, 7), (1000, 50)):
        starts = rng.choice(n_rows - length + 1, size=min(20, n_rows - length + 1), replace=False)
        expected = np.zeros(n_rows, bool)
        for s in starts:
            expected[s:s + length] = True
        assert np.array_equal(_rows_of(starts, length, n_rows), expected)
    assert not _rows_of(np.empty(0, np.int64), 5, 10).any()


def test_the_day_before_is_each_sensors_own():
    day = 86_400
    stamps = np.array([0, 60, day, day + 60, 0, day, day + 30], np.int64) + 1_700_000_000
    series = Series(columns=("x",), timestamps=stamps, values=np.arange(7, dtype=np.float32)[:, None], source="t",
                    lines=7, missing=0, malformed=0, segments=(0, 4), sensors=("a", "b"))
    got = _day_before(series, np.arange(7), [0])[:, 0]
    np.testing.assert_array_equal(got, [np.nan, np.nan, 0, 1, np.nan, 4, np.nan])


def fleet(sensors=4, rows=400):
    """``sensors`` series of ``rows`` readings, each its own size, one after another."""
    rng = np.random.default_rng(1)
    t = np.arange(rows)
    values = np.concatenate([(s + 1) * (np.sin(t / 20) + rng.normal(0, 0.2, rows)) for s in range(sensors)])
    return Series(columns=("x",), timestamps=np.tile(1_700_000_000 + 60 * t, sensors),
                  values=values.astype(np.float32)[:, None], source="fleet", lines=sensors * rows, missing=0,
                  malformed=0, segments=tuple(range(0, sensors * rows, rows)),
                  sensors=tuple(f"s{i}" for i in range(sensors)))


def test_a_training_run_past_the_budget_learns_from_the_sample_and_tests_every_sensor(tmp_path):
    config = load_config(None, ["data.features=[x]", "data.targets=[x]", "model.sequence_length=10",
                                "model.layers=[1, 4, 1]", "model.epochs=1", "model.batch_size=64",
                                "model.max_windows=200", f"model_store.path={tmp_path}"], environ={})
    series = fleet()
    trained = train(config, series, verbose=0)
    data = trained.forecaster.metadata.data
    assert data["train_windows"] + data["validation_windows"] <= 200
    assert data["sampled_from"] == {"train": 4 * 334, "validation": 4 * 17, "test": 4 * 40}
    assert data["max_windows"] == 200 and data["test_windows"] == len(trained.test_starts) == 23
    assert set(trained.test.per_sensor()) == set(series.sensors)  # the held-out slice scores every sensor
    # the gate backtests the current model on the very same windows
    assert np.array_equal(backtest(trained.forecaster, series, trained.test_starts).truth, trained.test.truth)


def test_without_a_budget_the_metadata_is_as_before(tmp_path):
    config = load_config(None, ["data.features=[x]", "data.targets=[x]", "model.sequence_length=10",
                                "model.layers=[1, 4, 1]", "model.epochs=1", "model.batch_size=64",
                                "model.max_windows=0", f"model_store.path={tmp_path}"], environ={})
    data = train(config, fleet(sensors=2, rows=200), verbose=0).forecaster.metadata.data
    assert "sampled_from" not in data and data["test_windows"] == 2 * (191 - int(191 * 0.9))
