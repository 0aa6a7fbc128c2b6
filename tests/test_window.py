import numpy as np

from stream_forecaster.window import sliding_windows, split_windows, window_starts


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
