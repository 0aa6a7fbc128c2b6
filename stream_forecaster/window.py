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

import io
import json
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Arrivals", "SensorWindows", "arrivals", "sliding_windows", "split_windows", "window_starts"]


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
    train, validate, test = (np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts)
    return train, validate, test


class SensorWindows:
    """Ring buffers of the last ``size`` accepted readings of each sensor, with the offsets they were read at.

    The readings live in preallocated blocks ``[block, size, width]`` (about
    1 MiB each), one more whenever the slots run out: appending a reading writes
    one row in place, no per-reading allocation, O(1) whatever the window
    length, and unused room is at most one block (a single doubling array left
    a third of it empty at 100,000 sensors). Each reading's input offset is kept
    beside it: the oldest offset still inside a partition's windows is where a
    refill of that partition must start (:meth:`refill_starts`).
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
        self.last = np.full(capacity, -1, dtype=np.int64)  # offset of the last reading; -1: free
        self._offsets = np.zeros((capacity, size), dtype=np.int64)  # the input offset of each row
        self.times = np.full(capacity, np.nan)  # the newest time a reading carried (s since 1970); NaN: none yet
        self.partitions = np.full(capacity, -1, dtype=np.int32)  # input partition the sensor's readings come from

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def capacity(self) -> int:
        return len(self._blocks) * self._block

    def slot(self, sensor: str, partition: int = -1) -> int:
        """The sensor's slot, allocated on its first reading; it belongs to the partition it was last read from."""
        slot = self.slots.get(sensor)
        if slot is not None:
            if self.partitions[slot] != partition:  # its key moved (partitions added, another producer's hash)
                self.partitions[slot] = partition
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
            self.partitions[slot] = partition
        return slot

    def slots_of(self, sensors: Sequence[str], partitions: Sequence[int]) -> np.ndarray:
        """:meth:`slot` of each (sensor, partition), in order: a sensor read from several partitions belongs to
        the last."""
        slots = list(map(self.slots.get, sensors))
        if None in slots:
            for i, slot in enumerate(slots):
                if slot is None:
                    slots[i] = self.slot(sensors[i], partitions[i])
        found = np.array(slots, dtype=np.int64)
        unique, last = _last_of_each(found)
        self.partitions[unique] = np.asarray(partitions)[last]
        return found

    def in_partition(self, partition: int) -> np.ndarray:
        """The slots in use whose sensors are read from ``partition``."""
        used = len(self._sensors)
        return np.flatnonzero((self.partitions[:used] == partition) & (self.last[:used] >= 0))

    def in_use(self) -> np.ndarray:
        """The slots holding a sensor."""
        used = len(self._sensors)
        return np.flatnonzero(self.last[:used] >= 0)

    def sensors(self, slots) -> list[str]:
        """The sensors of ``slots`` in use."""
        return [self._sensors[s] or "" for s in slots]

    def evict_before(self, partition: int, offset: int) -> list[int]:
        """Free the slots of ``partition``'s sensors whose last reading came before ``offset``; returns them."""
        used = len(self._sensors)
        idle = (self.partitions[:used] == partition) & (self.last[:used] >= 0) & (self.last[:used] < offset)
        return self.drop(np.flatnonzero(idle).tolist())

    def drop_partitions(self, partitions) -> list[int]:
        """Free the slots of sensors read from ``partitions`` (no longer ours); returns those slots."""
        used = len(self._sensors)
        return self.drop(np.flatnonzero(np.isin(self.partitions[:used], list(partitions))).tolist())

    def drop(self, slots) -> list[int]:
        """Free ``slots`` (their sensors start over empty); returns those that were in use."""
        evicted = []
        for slot in slots:
            sensor = self._sensors[slot]
            if sensor is not None:
                del self.slots[sensor]
                self._sensors[slot] = None
                self._count[slot] = self._head[slot] = 0
                self.last[slot] = -1
                self.times[slot] = np.nan
                self.partitions[slot] = -1
                self._free.append(slot)
                evicted.append(slot)
        return evicted

    def append(self, slot: int, values, offset: int = 0, timestamp: float = np.nan) -> bool:
        """Add a reading read at input ``offset`` that carried ``timestamp`` (NaN: none, which leaves the sensor's
        newest time as it was: its order is then its arrival); True when the sensor's window is full."""
        self.last[slot] = offset
        if timestamp == timestamp:
            self.times[slot] = timestamp
        head = self._head[slot]
        self._blocks[slot // self._block][slot % self._block, head] = values
        self._offsets[slot, head] = offset
        self._head[slot] = (head + 1) % self.size
        if self._count[slot] < self.size:
            self._count[slot] += 1
        return self._count[slot] == self.size

    def append_many(self, slots: np.ndarray, values: np.ndarray, offsets: np.ndarray, timestamps: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`append` each reading in turn (``slots[i]``, ``values[i]``, ...); return which filled their
        sensor's window, and write those windows, oldest row first, into ``out[:count]`` in order.

        The same rows and windows as one append at a time, in a few array
        operations: each window is gathered from this batch's readings and the
        rings as they were, so a sensor may send any number of readings.
        """
        n, size = len(slots), self.size
        if n == 0:
            return np.zeros(0, dtype=bool)
        order, first, unique, group, rank, taken = arrivals(slots)
        head, count = self._head[unique].astype(np.int64), self._count[unique].astype(np.int64)
        values = np.asarray(values, dtype=np.float32)
        full = count[group] + rank + 1 >= size
        if out is not None and full.any():
            rows = np.flatnonzero(full)
            # per window row, how many readings after it came in this batch before the window's newest one:
            # >= 0, that reading of this batch; < 0, the ring's reading that many rows back from its head
            steps = rank[rows, None] - np.arange(size - 1, -1, -1)
            from_batch = order[first[group[rows], None] + np.maximum(steps, 0)]
            from_ring = n + group[rows, None] * size + (head[group[rows], None] + steps) % size
            source = np.concatenate([values, self._rings(unique).reshape(-1, self.width)])
            out[:len(rows)] = source[np.where(steps >= 0, from_batch, from_ring)]
        kept = rank >= taken[group] - size  # a sensor's last `size` readings stay in its ring
        kept_slots, kept_rows = slots[kept], (head[group] + rank)[kept] % size
        blocks, within = np.divmod(kept_slots, self._block)
        kept_values = values[kept]
        for b in np.unique(blocks).tolist():
            here = blocks == b
            self._blocks[b][within[here], kept_rows[here]] = kept_values[here]
        self._offsets[kept_slots, kept_rows] = offsets[kept]
        self._head[unique] = (head + taken) % size
        self._count[unique] = np.minimum(count + taken, size)
        self.last[unique] = offsets[order[first + taken - 1]]
        timed = timestamps == timestamps
        if timed.any():  # a reading without a time leaves its sensor's newest one as it was
            timed_slots, newest = _last_of_each(slots[timed])
            self.times[timed_slots] = timestamps[timed][newest]
        return full

    def _rings(self, slots: np.ndarray) -> np.ndarray:
        """The rows of ``slots``' rings as stored ``[slots, size, width]`` (a copy)."""
        blocks, within = np.divmod(slots, self._block)
        rings = np.empty((len(slots), self.size, self.width), dtype=np.float32)
        for b in np.unique(blocks).tolist():
            here = blocks == b
            rings[here] = self._blocks[b][within[here]]
        return rings

    def full(self, slots: np.ndarray) -> np.ndarray:
        """Which of ``slots`` hold a full window."""
        return self._count[slots] == self.size

    def refill_starts(self, partitions=None) -> dict[int, int]:
        """Per partition (of ``partitions``, or all), the oldest offset still inside one of its sensors' windows:
        a full window's oldest row is at its head, one still filling starts at row 0."""
        used = np.flatnonzero(self.last[:len(self._sensors)] >= 0)
        held = self.partitions[used]
        wanted = np.unique(held).tolist() if partitions is None else partitions
        oldest = self._offsets[used, np.where(self._count[used] == self.size, self._head[used], 0)]
        starts = {}
        for partition in wanted:
            mine = oldest[held == partition]
            if len(mine):
                starts[partition] = int(mine.min())
        return starts

    def snapshot(self, partition: int) -> bytes:
        """Everything :meth:`restore` needs to bring back ``partition``'s windows exactly, as ``.npz`` bytes."""
        slots = self.in_partition(partition)
        values = self._rings(slots)
        names = json.dumps([self._sensors[s] for s in slots.tolist()]).encode()
        out = io.BytesIO()
        np.savez(out, names=np.frombuffer(names, dtype=np.uint8), values=values, offsets=self._offsets[slots],
                 head=self._head[slots], count=self._count[slots], last=self.last[slots], times=self.times[slots])
        return out.getvalue()

    def restore(self, partition: int, snapshot: bytes) -> int:
        """Bring back the windows :meth:`snapshot` saved for ``partition``; returns how many.

        Raises ``ValueError`` for a snapshot of other windows (another length or
        width) or one that is not a snapshot; nothing is restored then.
        """
        try:
            with np.load(io.BytesIO(snapshot), allow_pickle=False) as saved:
                arrays = {k: saved[k] for k in ("names", "values", "offsets", "head", "count", "last", "times")}
            names = json.loads(arrays["names"].tobytes())
        except (OSError, KeyError, ValueError, EOFError) as exc:
            raise ValueError(f"not a snapshot of windows ({type(exc).__name__}: {exc})") from None
        n = len(names)
        if (arrays["values"].shape != (n, self.size, self.width) or arrays["offsets"].shape != (n, self.size)
                or any(len(arrays[k]) != n for k in ("head", "count", "last", "times"))
                or not all(isinstance(name, str) for name in names)
                or not ((0 <= arrays["head"]) & (arrays["head"] < self.size)).all()
                or not ((0 <= arrays["count"]) & (arrays["count"] <= self.size)).all()):
            raise ValueError(f"a snapshot of {arrays['values'].shape[1:]} windows, not ({self.size}, {self.width})")
        for i, name in enumerate(names):
            slot = self.slot(name, partition)
            self._blocks[slot // self._block][slot % self._block] = arrays["values"][i]
            self._offsets[slot] = arrays["offsets"][i]
            self._head[slot], self._count[slot] = arrays["head"][i], arrays["count"][i]
            self.last[slot], self.times[slot] = arrays["last"][i], arrays["times"][i]
        return n

    def window(self, slot: int) -> np.ndarray:
        """The sensor's readings, oldest first (a copy)."""
        rows = self._blocks[slot // self._block][slot % self._block]
        head = int(self._head[slot])
        return np.concatenate([rows[head:], rows[:head]])

    def _grow(self) -> None:
        new = 2 * len(self._head)
        self._head = np.resize(self._head, new)
        self._head[new // 2:] = 0
        self._count = np.resize(self._count, new)
        self._count[new // 2:] = 0
        self.last = np.resize(self.last, new)
        self.last[new // 2:] = -1
        self._offsets = np.resize(self._offsets, (new, self.size))
        self.partitions = np.resize(self.partitions, new)
        self.partitions[new // 2:] = -1
        self.times = np.resize(self.times, new)
        self.times[new // 2:] = np.nan


class Arrivals(NamedTuple):
    """Items in arrival order, grouped by slot: ``order`` sorts them by slot, keeping arrival order within one;
    ``first[g]`` is where group ``g`` starts in that order; ``unique[g]`` its slot, ``counts[g]`` its size; per
    item, its ``group`` and ``rank``, how many of its slot's items came before it."""

    order: np.ndarray
    first: np.ndarray
    unique: np.ndarray
    group: np.ndarray
    rank: np.ndarray
    counts: np.ndarray


def arrivals(slots: np.ndarray) -> Arrivals:
    """Group ``slots`` (in arrival order) by slot, in a few array operations."""
    n = len(slots)
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = np.flatnonzero(starts)
    group = np.empty(n, dtype=np.int64)
    group[order] = np.cumsum(starts) - 1
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first[group[order]]
    return Arrivals(order, first, ordered[first], group, rank, np.diff(np.append(first, n)))


def _last_of_each(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``items`` and the index of each one's last occurrence."""
    distinct, first_from_end = np.unique(items[::-1], return_index=True)
    return distinct, len(items) - 1 - first_from_end
