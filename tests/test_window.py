import numpy as np

from stream_forecaster.window import sliding_windows, split_index


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


def test_split_is_time_ordered_and_rounds_down():
    assert split_index(100, 0.9) == 90
    assert split_index(9, 0.5) == 4
