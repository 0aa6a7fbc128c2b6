import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_forecaster.window import SensorWindows, sliding_windows, split_windows, window_starts


def test_windows_are_consecutive_rows():
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    windows = sliding_windows(values, 3)
    assert windows.shape == (4, 3, 2)
    np.testing.assert_array_equal(windows[0], values[0:3])
    np.testing.assert_array_equal(windows[3], values[3:6])


def test_windows_are_a_view_not_a_copy():
    values = np.zeros((1000, 1), dtype=np.float32)
    windows = sliding_windows(values, 50)
    assert np.shares_memory(windows, values)
    assert not windows.flags.writeable
    values[60, 0] = 7.0
    assert windows[11, 49, 0] == 7.0 and windows[60, 0, 0] == 7.0


def test_too_short_gives_no_windows():
    assert sliding_windows(np.zeros((3, 2)), 5).shape == (0, 5, 2)


def test_split_is_time_ordered_within_each_segment():
    # two sensors: rows 0-13 and 14-33; windows of 5 -> 10 and 16 windows
    train, validation, test = split_windows([0, 14], 34, 5, 0.5, 0.2)
    assert train.tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19, 20]
    assert validation.tolist() == [4, 21]
    assert test.tolist() == [5, 6, 7, 8, 9] + list(range(22, 30))


def test_windows_never_span_two_segments():
    starts = window_starts([0, 3, 10], 12, 4)
    assert [s.tolist() for s in starts] == [[], [3, 4, 5, 6], []]


def series(stamps, values, segments=(0,)):
    from stream_forecaster.files import Series

    values = np.asarray(values, dtype=np.float32).reshape(-1, 1)
    return Series(("x",), np.asarray(stamps, dtype=np.int64), values, "test", len(stamps), 0, 0, segments=segments)


def test_select_keeps_each_sensors_segment_and_drops_emptied_ones():
    s = series(range(10), range(10), segments=(0, 4, 7))
    kept = s.select(np.array([1, 1, 0, 0, 0, 0, 0, 1, 1, 1], dtype=bool))
    assert kept.segments == (0, 2) and kept.values[:, 0].tolist() == [0, 1, 7, 8, 9]
    assert s.select(np.arange(10) >= 5).segments == (0, 2)


@pytest.mark.integration  # training imports TensorFlow
def test_seasonal_naive_is_the_reading_exactly_one_day_earlier_of_the_same_sensor():
    from stream_forecaster.training import _day_before

    day = 86_400
    stamps = [0, 60, 120, day, day + 60, day + 180, 0, day]  # two sensors; the second starts at row 6
    s = series(stamps, [1, 2, 3, 10, 20, 30, 5, 50], segments=(0, 6))
    got = _day_before(s, np.array([3, 4, 5, 7]), [0])[:, 0]
    np.testing.assert_array_equal(got[:2], [1, 2])  # minutes 0 and 1 of the day before
    assert np.isnan(got[2])  # day + 180 s: that minute is missing a day earlier
    assert got[3] == 5  # the second sensor's own reading, not the first one's


@given(st.integers(1, 6), st.integers(1, 3), st.lists(st.integers(0, 4), max_size=60))
def test_sensor_windows_hold_each_sensors_last_readings_oldest_first(size, width, sensors):
    windows, history = SensorWindows(size, width, capacity=2), {}
    for n, sensor in enumerate(sensors):
        values = [float(n * 10 + c) for c in range(width)]
        slot = windows.slot(f"s{sensor}")
        history.setdefault(sensor, []).append(values)
        assert windows.append(slot, values) == (len(history[sensor]) >= size)
        if len(history[sensor]) >= size:
            expected = np.array(history[sensor][-size:], dtype=np.float32)
            np.testing.assert_array_equal(windows.window(slot), expected)


def test_a_sensor_belongs_to_the_partition_it_was_last_read_from():
    windows = SensorWindows(3, 1)
    slot = windows.slot("s", 1)
    windows.append(slot, [1.0])
    assert windows.slot("s", 2) == slot  # its key now hashes elsewhere (partitions added)
    assert windows.drop_partitions({1}) == []
    assert windows.drop_partitions({2}) == [slot]


@given(st.integers(1, 5), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1)), max_size=60))
def test_each_partitions_refill_starts_at_the_oldest_offset_its_windows_hold(size, readings):
    windows, held = SensorWindows(size, 1, capacity=2), {}
    for offset, (sensor, partition) in enumerate(readings):
        slot = windows.slot(f"s{sensor}", partition)
        windows.append(slot, [float(offset)], offset)
        held[sensor] = ([*held.get(sensor, ([], None))[0], offset][-size:], partition)
    expected = {}
    for offsets, partition in held.values():
        expected[partition] = min(expected.get(partition, offsets[0]), offsets[0])
    assert windows.refill_starts() == expected
    assert windows.refill_starts([1]) == {p: o for p, o in expected.items() if p == 1}


def test_a_snapshot_brings_a_partitions_windows_back_exactly_and_nothing_else_is_taken_for_one():
    windows = SensorWindows(3, 2, capacity=2)
    for offset, (sensor, partition) in enumerate([("a", 0), ("b", 1), ("a", 0), ("c", 0), ("a", 0), ("a", 0)]):
        windows.append(windows.slot(sensor, partition), [offset, -offset], offset, 1000.0 + offset)
    restored = SensorWindows(3, 2)
    assert restored.restore(0, windows.snapshot(0)) == 2 and set(restored.slots) == {"a", "c"}
    for sensor in ("a", "c"):
        mine, theirs = windows.slots[sensor], restored.slots[sensor]
        np.testing.assert_array_equal(restored.window(theirs), windows.window(mine))
        assert restored.times[theirs] == windows.times[mine] and restored.last[theirs] == windows.last[mine]
    assert restored.refill_starts() == {0: windows.refill_starts()[0]}
    # appending goes on as it would have: the ring's head and count came back too
    for w in (windows, restored):
        w.append(w.slots["c"], [9, 9], 9)
        w.append(w.slots["c"], [10, 10], 10)
    np.testing.assert_array_equal(restored.window(restored.slots["c"]), windows.window(windows.slots["c"]))
    for other in (SensorWindows(4, 2), SensorWindows(3, 1)):
        with pytest.raises(ValueError):
            other.restore(0, windows.snapshot(0))
        assert len(other) == 0
    with pytest.raises(ValueError):
        SensorWindows(3, 2).restore(0, b"not a snapshot")


@st.composite
def reading_batches(draw):
    """Batches of (slot, value, offset, time) in arrival order: few sensors, so some send more readings in one
    batch than a window holds; some readings carry no time."""
    size = draw(st.integers(min_value=1, max_value=6))
    batches, offset = [], 0
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        batch = []
        for _ in range(draw(st.integers(min_value=0, max_value=25))):
            slot = draw(st.integers(min_value=0, max_value=3))
            timed = draw(st.booleans())
            batch.append((slot, float(offset), offset, float(offset) if timed else np.nan))
            offset += 1
        batches.append(batch)
    return size, batches


@given(reading_batches())
def test_appending_a_batch_at_once_is_appending_each_reading_in_turn(drawn):
    size, batches = drawn
    one_by_one, at_once = SensorWindows(size, 2), SensorWindows(size, 2)
    for w in (one_by_one, at_once):
        w.slots_of([f"s{i}" for i in range(4)], [0] * 4)
    for batch in batches:
        expected_full, expected_windows = [], []
        for slot, value, offset, when in batch:
            full = one_by_one.append(slot, [value, -value], offset, when)
            expected_full.append(full)
            if full:
                expected_windows.append(one_by_one.window(slot))
        slots = np.array([b[0] for b in batch], dtype=np.int64)
        values = np.array([[b[1], -b[1]] for b in batch]).reshape(-1, 2)
        out = np.full((len(batch), size, 2), np.nan, dtype=np.float32)
        full = at_once.append_many(slots, values, np.array([b[2] for b in batch], dtype=np.int64),
                                   np.array([b[3] for b in batch]), out)
        assert full.tolist() == expected_full
        np.testing.assert_array_equal(out[:len(expected_windows)], np.array(expected_windows).reshape(-1, size, 2))
        for slot in range(4):
            np.testing.assert_array_equal(at_once.window(slot), one_by_one.window(slot))
        np.testing.assert_array_equal(at_once.times[:4], one_by_one.times[:4])
        np.testing.assert_array_equal(at_once.last[:4], one_by_one.last[:4])
        assert at_once.refill_starts() == one_by_one.refill_starts()


def test_a_sensor_read_from_another_partition_belongs_to_the_last():
    windows = SensorWindows(3, 1)
    slots = windows.slots_of(["a", "b", "a"], [0, 1, 2])
    assert slots.tolist() == [0, 1, 0]
    assert windows.partitions[:2].tolist() == [2, 1]
