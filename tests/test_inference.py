"""The inference runner and its batch shapes, with the stub forecaster: no TensorFlow."""

import itertools
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_forecaster.inference import CALL_COST, MAX_CHUNK, InferenceRunner, batch_shapes, compiled_pieces, share
from stream_forecaster.testing import StubForecaster


def _cheapest_costs(largest: int) -> list[int]:
    """The least cost of calls covering n windows, for every n up to ``largest``, by dynamic programming."""
    shapes, best = batch_shapes(MAX_CHUNK), [0]
    for n in range(1, largest + 1):
        best.append(min(s + CALL_COST + best[max(0, n - s)] for s in shapes))
    return best


CHEAPEST = _cheapest_costs(3 * MAX_CHUNK + 5)


@given(st.integers(min_value=0, max_value=3 * MAX_CHUNK + 5))
def test_batches_are_cut_into_the_cheapest_calls_of_a_few_shapes(n):
    pieces = compiled_pieces(n)
    assert set(pieces) <= set(batch_shapes(MAX_CHUNK)) and len(batch_shapes(MAX_CHUNK)) <= 7
    assert pieces == sorted(pieces, reverse=True)
    assert sum(pieces) >= n and (n == 0 or sum(pieces) - pieces[-1] < n)  # only the last call holds padding
    assert sum(size + CALL_COST for size in pieces) == CHEAPEST[n]
    assert all(pieces.count(p) < 4 for p in pieces if p < MAX_CHUNK)


def test_a_few_windows_take_one_padded_call_rather_than_many_exact_ones():
    assert compiled_pieces(15) == [16]  # not 4 + 4 + 4 + 1 + 1 + 1
    assert compiled_pieces(5) == [4, 1]  # padding 11 windows would cost more than a second call


@given(st.integers(min_value=0, max_value=2 * MAX_CHUNK), st.integers(min_value=1, max_value=8))
def test_a_batch_is_shared_among_the_threads_in_runs_of_whole_calls(n, threads):
    pieces = compiled_pieces(n)
    parts = share(pieces, threads)
    assert sum(parts) == sum(pieces) and len(parts) <= threads and (n == 0 or all(parts))
    bounds, run = set(), 0
    for size in pieces:
        run += size
        bounds.add(run)
    assert set(itertools.accumulate(parts)) <= bounds | {0}  # no call is split
    if threads > 1 and len(pieces) > 1:
        assert len(parts) > 1  # a batch of several calls never waits on one thread
    cost = sum(size + CALL_COST for size in pieces)
    biggest = max(pieces, default=0) + CALL_COST
    assert all(_cost(part) <= cost / threads + biggest for part in _runs(pieces, parts))


def _runs(pieces, parts):
    it = iter(pieces)
    for part in parts:
        run = []
        while sum(run) < part:
            run.append(next(it))
        yield run


def _cost(run):
    return sum(size + CALL_COST for size in run)


class ChunkedStub(StubForecaster):
    """The stub, with calls cut as the compiled model cuts them, failing on calls of one window if told."""

    fail_single = False

    def calls(self, n):
        return compiled_pieces(n)

    def forecast_scaled(self, windows):
        if self.fail_single and len(windows) == 1:
            raise RuntimeError("device lost")
        return super().forecast_scaled(windows)


def test_forecasts_on_several_inference_threads_come_back_in_order():
    rng = np.random.default_rng(5)
    forecaster, runner = ChunkedStub(["x"], ["x"], 5, step=0.5), InferenceRunner(3)
    try:
        chunks = [rng.normal(size=(n, 4, 1)).astype(np.float32) for n in (64, 1, 17, 256, 5)]
        futures = [runner.forecast_async(forecaster, c) for c in chunks]
        for chunk, future in zip(chunks, futures):
            predictions, scale, seconds = future.result()
            expected, expected_scale = forecaster.forecast_scaled(chunk)
            np.testing.assert_array_equal(predictions, expected)
            np.testing.assert_array_equal(scale, expected_scale)
            assert seconds > 0
    finally:
        runner.close()


def test_a_batch_of_several_calls_runs_on_several_threads_at_once():
    both_running = threading.Barrier(2, timeout=10)  # each part waits for the other: one thread alone would time out
    names = set()

    class Meeting(ChunkedStub):
        def forecast_scaled(self, windows):
            names.add(threading.current_thread().name)
            both_running.wait()
            return super().forecast_scaled(windows)

    runner = InferenceRunner(2)
    try:
        predictions, _, _ = runner.forecast_async(Meeting(["x"], ["x"], 5), np.ones((17, 4, 1), np.float32)).result()
    finally:
        runner.close()
    assert len(predictions) == 17 and len(names) == 2 and all(n.startswith("inference") for n in names)


def test_a_failed_part_fails_the_whole_forecast():
    forecaster, runner = ChunkedStub(["x"], ["x"], 5), InferenceRunner(2)
    forecaster.fail_single = True
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            runner.forecast_async(forecaster, np.zeros((17, 4, 1), np.float32)).result()  # 16 | 1
    finally:
        runner.close()
