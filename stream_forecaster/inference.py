"""The inference runner: forecasts computed on a pool of threads while the daemon's main thread goes on.

The daemon owns one :class:`InferenceRunner`; the pipeline hands it each
chunk's windows and collects the future later, so parsing the next readings and
publishing the last forecasts overlap the model's work (TensorFlow releases the
GIL while it computes). A batch is cut into a few fixed shapes, each compiled
once (:func:`compiled_pieces`), and its calls are shared among the threads in
consecutive runs of about equal cost (:func:`share`). No TensorFlow here: the
runner drives any :class:`~stream_forecaster.seams.Forecaster`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .seams import Forecaster

__all__ = ["InferenceRunner", "batch_shapes", "compiled_pieces", "plain_pieces", "share", "usable_cores"]


def usable_cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MAX_CHUNK = 4096  # windows per compiled call (a power of _BASE); bounds the memory of one call
_BASE = 4  # batch shapes are its powers: 7 shapes to compile (powers of two made 13, and a swap took 9 s)


def batch_shapes(largest: int) -> list[int]:
    """The batch shapes up to ``largest`` windows, smallest first."""
    shapes = [1]
    while shapes[-1] * _BASE <= min(largest, MAX_CHUNK):
        shapes.append(shapes[-1] * _BASE)
    return shapes


CALL_COST = 7  # a compiled call's fixed cost (its Python, its dispatch), in windows computed


def compiled_pieces(n: int) -> list[int]:
    """Batch shapes, largest first, whose calls forecast ``n`` windows at the least cost, counting CALL_COST for
    each call and one for each window it computes: the last call may be padded. 15 windows take one call of 16,
    not six calls."""
    return [MAX_CHUNK] * (n // MAX_CHUNK) + list(_cover(n % MAX_CHUNK)[1])


@functools.lru_cache(maxsize=MAX_CHUNK)
def _cover(n: int) -> tuple[int, tuple[int, ...]]:
    """(cost, shapes) of the cheapest calls for ``n`` < MAX_CHUNK windows: pad them all into the smallest shape
    that holds them, or take the largest that fits and cover the rest."""
    if n <= 0:
        return 0, ()
    shapes = batch_shapes(MAX_CHUNK)
    largest = max(s for s in shapes if s <= n)
    cost, rest = _cover(n - largest)
    padded = min(s for s in shapes if s >= n)
    if padded < largest + cost:
        return padded + CALL_COST, (padded,)
    return largest + CALL_COST + cost, (largest, *rest)


def plain_pieces(n: int) -> list[int]:
    """``n`` windows in calls of at most MAX_CHUNK (the plain graph takes any batch size)."""
    return [min(MAX_CHUNK, n - start) for start in range(0, n, MAX_CHUNK)]


def share(pieces: list[int], threads: int) -> list[int]:
    """Window counts of up to ``threads`` consecutive runs of ``pieces``, of about equal cost (where the last
    piece is padded, the last run holds fewer windows than its count).

    A small batch cut into several calls then finishes in the time of its
    largest run instead of all of them one after the other (latency at light load).
    """
    total = sum(size + CALL_COST for size in pieces)
    parts: list[int] = []
    run = cost = 0
    for size in pieces:
        if run and len(parts) < threads - 1 and cost + (size + CALL_COST) / 2 > total / threads * (len(parts) + 1):
            parts.append(run)
            run = 0
        run += size
        cost += size + CALL_COST
    return parts + [run]


def _gathered(futures: list[Future]) -> Future:
    """One future of ``(predictions, scales, longest seconds)`` over futures of ``(predictions, scales, seconds)``."""
    if len(futures) == 1:
        return futures[0]
    gathered: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            results = [f.result() for f in futures]
        except BaseException as exc:  # noqa: BLE001 (handed on to whoever waits on the gathered future)
            gathered.set_exception(exc)
            return
        gathered.set_result((np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]),
                             max(r[2] for r in results)))

    for f in futures:
        f.add_done_callback(one_done)
    return gathered


class InferenceRunner:
    """Forecasts on ``threads`` threads (None: one per usable core); :meth:`forecast_async` returns a future."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or usable_cores()
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="inference")

    def forecast_async(self, forecaster: Forecaster, windows: np.ndarray) -> Future:
        """A future of ``(predictions, scale, seconds the longest call took)`` for ``windows``.

        Leave ``windows`` untouched until the result is in. A batch cut into
        several calls is shared among the threads, so a small batch finishes in
        the time of its largest run (latency at light load).
        """
        def timed(part):
            started = time.perf_counter()
            predictions, scale = forecaster.forecast_scaled(part)
            return predictions, scale, time.perf_counter() - started

        futures, start = [], 0
        for size in share(forecaster.calls(len(windows)), self.threads):
            futures.append(self._executor.submit(timed, windows[start:start + size]))
            start += size
        return _gathered(futures)

    def close(self) -> None:
        """Stop taking work; forecasts already queued still finish."""
        self._executor.shutdown(wait=False)
