"""Windows over a series of readings: the one windowing routine.

A window is ``sequence_length`` consecutive accepted readings: the first
``sequence_length - 1`` are the model input, the last is the truth the model
predicts. Offline windows are strided views, never copies, so windowing the full
2-million-row data set costs no memory. Online, :class:`SensorWindows` keeps the
last ``sequence_length - 1`` readings of each sensor in one preallocated array,
and copies a sensor's window out in time order, the same rows the offline view
would give.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SensorWindows", "sliding_windows", "split_windows", "window_starts"]


def sliding_windows(values: np.ndarray, length: int) -> np.ndarray:
    """Read-only view ``[n - length + 1, length, width]`` of ``values[n, width]``."""
    if values.ndim != 2:
        raise ValueError(f"expected a [rows, columns] array, got shape {values.shape}")
    if len(values) < length:
        return np.empty((0, length, values.shape[1]), dtype=values.dtype)
    view = np.lib.stride_tricks.sliding_window_view(values, length, axis=0)
    return view.transpose(0, 2, 1)


def window_starts(segments: Sequence[int], n_rows: int, length: int) -> list[np.ndarray]:
    """First rows of the windows that lie inside one segment, per segment.

    ``segments`` are the first rows of consecutive segments (one per sensor);
    a window never spans two sensors.
    """
    bounds = [*segments, n_rows]
    return [np.arange(start, max(start, end - length + 1)) for start, end in zip(bounds[:-1], bounds[1:])]


def split_windows(segments: Sequence[int], n_rows: int, length: int, train_fraction: float,
                  validation_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window first rows for training, validation and test, split in time order within each segment.

    Of each segment's windows the oldest ``train_fraction`` train (their last
    ``validation_fraction`` validate) and the rest, the most recent, test.
    """
    parts: tuple[list, list, list] = ([], [], [])
    for starts in window_starts(segments, n_rows, length):
        split = int(len(starts) * train_fraction)
        validation = int(split * validation_fraction)
        for part, chosen in zip(parts, (starts[:split - validation], starts[split - validation:split], starts[split:])):
            part.append(chosen)
    return tuple(np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts)


class SensorWindows:
    """Ring buffers of the last ``size`` accepted readings of each sensor.

    The readings live in preallocated blocks ``[block, size, width]`` (about
    1 MiB each), one more whenever the slots run out: appending a reading writes
    one row in place, no per-reading allocation, O(1) whatever the window
    length, and unused room is at most one block (a single doubling array left
    a third of it empty at 100,000 sensors).
    """

    def __init__(self, size: int, width: int, capacity: int = 1024):
        self.size, self.width = size, width
        self.slots: dict[str, int] = {}
        self._sensors: list[str | None] = []  # slot -> sensor, None when free
        self._free: list[int] = []
        self._block = max(1, min(4096, 2**20 // (size * width * 4)))  # slots per block of rows
        self._blocks: list[np.ndarray] = []
        self._head = np.zeros(capacity, dtype=np.int16)  # next row to write (size <= 10,000)
        self._count = np.zeros(capacity, dtype=np.int16)  # rows held, at most size
        self._seen = np.zeros(capacity, dtype=np.float64)  # monotonic time of the last reading
        self.times = np.full(capacity, np.nan)  # the time the last reading carried (s since 1970); NaN: none
        self._partition = np.full(capacity, -1, dtype=np.int32)  # input partition the sensor's readings come from

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> int:
        return len(self._blocks) * self._block

    def slot(self, sensor: str, partition: int = -1) -> int:
        """The sensor's slot, allocated on its first reading; it belongs to the partition it was last read from."""
        slot = self.slots.get(sensor)
        if slot is not None:
            if self._partition[slot] != partition:  # its key moved (partitions added, another producer's hash)
                self._partition[slot] = partition
        else:
            if self._free:
                slot = self._free.pop()
                self._sensors[slot] = sensor
            else:
                slot = len(self._sensors)
                if slot == self.capacity:
                    self._blocks.append(np.zeros((self._block, self.size, self.width), dtype=np.float32))
                if slot == len(self._head):
                    self._grow()
                self._sensors.append(sensor)
            self.slots[sensor] = slot
            self._partition[slot] = partition
        return slot

    def evict_idle(self, now: float, ttl: float) -> list[int]:
        """Free the slots of sensors without a reading since ``now - ttl``; returns those slots."""
        return self.drop(np.flatnonzero(self._seen[: len(self._sensors)] < now - ttl).tolist())

    def drop_partitions(self, partitions) -> list[int]:
        """Free the slots of sensors read from ``partitions`` (no longer ours); returns those slots."""
        used = len(self._sensors)
        return self.drop(np.flatnonzero(np.isin(self._partition[:used], list(partitions))).tolist())

    def drop(self, slots) -> list[int]:
        """Free ``slots`` (their sensors start over empty); returns those that were in use."""
        evicted = []
        for slot in slots:
            sensor = self._sensors[slot]
            if sensor is not None:
                del self.slots[sensor]
                self._sensors[slot] = None
                self._count[slot] = self._head[slot] = 0
                self._seen[slot] = np.inf  # free: never idle
                self.times[slot] = np.nan
                self._partition[slot] = -1
                self._free.append(slot)
                evicted.append(slot)
        return evicted

    def append(self, slot: int, values, now: float = 0.0, timestamp: float = np.nan) -> bool:
        """Add a reading seen at monotonic time ``now`` that carried ``timestamp`` (NaN: none); True when the
        sensor's window is full."""
        self._seen[slot] = now
        self.times[slot] = timestamp
        head = self._head[slot]
        self._blocks[slot // self._block][slot % self._block, head] = values
        self._head[slot] = (head + 1) % self.size
        if self._count[slot] < self.size:
            self._count[slot] += 1
        return self._count[slot] == self.size

    def window(self, slot: int) -> np.ndarray:
        """The sensor's readings, oldest first (a copy)."""
        out = np.empty((self.size, self.width), dtype=np.float32)
        self.window_into(slot, out)
        return out

    def window_into(self, slot: int, out: np.ndarray) -> None:
        """Write the sensor's readings, oldest first, into ``out[size, width]``: two slice copies, no gather
        (the gather through an index array took a tenth of the daemon's main thread)."""
        rows = self._blocks[slot // self._block][slot % self._block]
        head = int(self._head[slot])
        out[:self.size - head] = rows[head:]
        out[self.size - head:] = rows[:head]

    def _grow(self) -> None:
        new = 2 * len(self._head)
        self._head = np.resize(self._head, new)
        self._head[new // 2:] = 0
        self._count = np.resize(self._count, new)
        self._count[new // 2:] = 0
        self._seen = np.resize(self._seen, new)
        self._seen[new // 2:] = np.inf
        self._partition = np.resize(self._partition, new)
        self._partition[new // 2:] = -1
        self.times = np.resize(self.times, new)
        self.times[new // 2:] = np.nan
