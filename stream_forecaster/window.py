"""Windows over a series of readings: the one windowing routine.

A window is ``sequence_length`` consecutive accepted readings: the first
``sequence_length - 1`` are the model input, the last is the truth the model
predicts. Offline windows are strided views, never copies, so windowing the full
2-million-row data set costs no memory.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sliding_windows", "split_index"]


def sliding_windows(values: np.ndarray, length: int) -> np.ndarray:
    """Read-only view ``[n - length + 1, length, width]`` of ``values[n, width]``."""
    if values.ndim != 2:
        raise ValueError(f"expected a [rows, columns] array, got shape {values.shape}")
    if len(values) < length:
        return np.empty((0, length, values.shape[1]), dtype=values.dtype)
    view = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)
    return view.transpose(0, 2, 1)


def split_index(n_windows: int, train_fraction: float) -> int:
    """Number of leading (oldest) windows that go to training in a time-ordered split."""
    return int(n_windows * train_fraction)
