import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_forecaster.config import load_config
from stream_forecaster.inference import InferenceRunner
from stream_forecaster.model import Forecaster, Scaler, build_model
from stream_forecaster.store import ModelMetadata

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")


def spec(layers, sequence_length=8, features=None, targets=None):
    features = features or [f"f{i}" for i in range(layers[0])]
    targets = targets or [f"t{i}" for i in range(layers[-1])]
    return load_config(None, ["model.predict=level", "data.normalization=standardize", f"model.layers={list(layers)}",
                              f"model.sequence_length={sequence_length}",
                              f"data.features={features}", f"data.targets={targets}"], environ={}).model


@pytest.mark.parametrize("layers", [[1, 6, 1], [1, 6, 5, 1], [3, 4, 5, 6, 2]])
def test_stacked_lstm_wiring(layers):
    model = build_model(spec(layers))
    lstms = [l for l in model.layers if isinstance(l, keras.layers.LSTM)]
    dropouts = [l for l in model.layers if isinstance(l, keras.layers.Dropout)]
    assert [l.units for l in lstms] == layers[1:-1]
    assert [l.return_sequences for l in lstms] == [True] * (len(lstms) - 1) + [False]
    assert len(dropouts) == len(lstms) and all(d.rate == 0.2 for d in dropouts)
    assert model.layers[-1].units == layers[-1]
    assert model.input_shape == (None, 7, layers[0])
    assert model.output_shape == (None, layers[-1])
    assert type(model.loss).__name__ == "Huber"
    assert type(model.optimizer).__name__ == "Adam"


def test_default_is_the_seed_architecture_over_every_column_and_the_preset_is_the_seed():
    default = load_config(None, environ={})
    model = build_model(default.model, default.layers())
    assert [type(l).__name__ for l in model.layers] == ["LSTM", "Dropout", "LSTM", "Dropout", "Dense"]
    assert model.input_shape == (None, 49, 7)
    seed = build_model(load_config(None, ["model.preset=tutorial"], environ={}).model)
    assert seed.input_shape == (None, 49, 1) and seed.loss == "mse"


def forecaster_of(model, meta: dict, version=None, jit_compile=True) -> Forecaster:
    return Forecaster(model, ModelMetadata.from_dict(meta), version, jit_compile)


def metadata(features, targets, sequence_length, rng):
    return {
        "features": features, "targets": targets, "sequence_length": sequence_length,
        "normalization": {
            "features": Scaler(rng.normal(size=len(features)).astype(np.float32),
                               rng.uniform(1, 2, size=len(features)).astype(np.float32)).to_dict(),
            "targets": Scaler(np.full(len(targets), 3.0, np.float32), np.full(len(targets), 2.0, np.float32)).to_dict(),
        },
    }


def test_forecast_normalises_in_and_out():
    rng = np.random.default_rng(0)
    model = build_model(spec([2, 4, 3], sequence_length=5))
    meta = metadata(["a", "b"], ["x", "y", "z"], 5, rng)
    forecaster = forecaster_of(model, meta)
    windows = rng.normal(size=(9, 4, 2)).astype(np.float32)
    scaled = (windows - forecaster.feature_scaler.mean) / forecaster.feature_scaler.scale
    expected = model(scaled, training=False).numpy() * 2.0 + 3.0
    np.testing.assert_allclose(forecaster.forecast(windows), expected, rtol=1e-5, atol=1e-5)


def test_forecast_rejects_wrong_window_shape():
    rng = np.random.default_rng(0)
    forecaster = forecaster_of(build_model(spec([1, 4, 1], sequence_length=5)), metadata(["a"], ["x"], 5, rng))
    with pytest.raises(ValueError, match=r"\[n, 4, 1\]"):
        forecaster.forecast(np.zeros((2, 5, 1)))


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(1)
    forecaster = forecaster_of(build_model(spec([2, 5, 4, 2], sequence_length=6)),
                               metadata(["a", "b"], ["x", "y"], 6, rng))
    windows = rng.normal(size=(17, 5, 2)).astype(np.float32)
    forecaster.save(tmp_path)
    loaded = Forecaster.load(tmp_path, version="9")
    assert loaded.version == "9" and loaded.metadata == forecaster.metadata
    np.testing.assert_array_equal(loaded.forecast(windows), forecaster.forecast(windows))


def test_scaler_center_and_standardize():
    values = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    center = Scaler.fit(values, "center")
    np.testing.assert_array_equal(center.transform(values), [[-1, 0], [1, 0]])
    standard = Scaler.fit(values, "standardize")
    np.testing.assert_array_equal(standard.scale, [1.0, 1.0])  # constant column keeps scale 1
    np.testing.assert_allclose(standard.inverse(standard.transform(values)), values)


def test_change_forecast_adds_the_scaled_step_to_the_last_reading_of_the_target():
    rng = np.random.default_rng(1)
    model = build_model(spec([2, 4, 1], sequence_length=5))
    meta = {**metadata(["a", "x"], ["x"], 5, rng), "predict": "change"}
    forecaster = forecaster_of(model, meta)
    windows = rng.normal(size=(6, 4, 2)).astype(np.float32)
    scaled = (windows - forecaster.feature_scaler.mean) / forecaster.feature_scaler.scale
    step = model(scaled, training=False).numpy()
    np.testing.assert_allclose(forecaster.forecast(windows), windows[:, -1, [1]] + step * 2.0, rtol=1e-5, atol=1e-5)


def test_bounds_add_the_stored_error_quantiles():
    rng = np.random.default_rng(2)
    meta = {**metadata(["a"], ["x", "y"], 5, rng),
            "intervals": {"quantiles": [0.1, 0.9], "lower": [-1.0, -0.5], "upper": [2.0, 0.25]}}
    forecaster = forecaster_of(build_model(spec([1, 4, 2], sequence_length=5)), meta)
    predictions = rng.normal(size=(3, 2)).astype(np.float32)
    scale = np.full_like(predictions, 2.0)  # the global normalisation's: a version of before gives data units
    lower, upper = forecaster.bounds(predictions, scale)
    np.testing.assert_allclose(lower, predictions + [-1.0, -0.5], rtol=1e-6)
    np.testing.assert_allclose(upper, predictions + [2.0, 0.25], rtol=1e-6)
    assert forecaster.interval_quantiles == (0.1, 0.9)
    assert forecaster_of(build_model(spec([1, 4, 2], sequence_length=5)), metadata(["a"], ["x", "y"], 5, rng)).bounds(
        predictions, scale) is None


def test_min_step_keeps_the_last_reading_when_the_forecast_moves_less():
    rng = np.random.default_rng(3)
    meta = metadata(["x", "a"], ["x"], 5, rng)
    free = forecaster_of(build_model(spec([2, 4, 1], sequence_length=5)), meta)
    windows = rng.normal(loc=3.0, size=(50, 4, 2)).astype(np.float32)
    raw, last = free.forecast(windows), windows[:, -1, [0]]
    threshold = float(np.median(np.abs(raw - last)))
    held = forecaster_of(free.model, {**meta, "min_step": [threshold]}).forecast(windows)
    small = np.abs(raw - last) < threshold
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(held[small], last[small])
    np.testing.assert_array_equal(held[~small], raw[~small])


def test_min_step_calibration_holds_small_noisy_steps_and_keeps_real_ones():
    from stream_forecaster.training import Backtest, _calibrate_min_step

    rng = np.random.default_rng(4)
    n = 4000
    last = rng.normal(size=(n, 1)).astype(np.float32)
    jump = rng.random((n, 1)) < 0.05  # rare real steps of size 3, which the forecast sees coming
    truth = last + np.where(jump, 3.0, rng.normal(scale=0.01, size=(n, 1))).astype(np.float32)
    forecast = last + np.where(jump, 3.0, rng.normal(scale=0.2, size=(n, 1))).astype(np.float32)  # noisy otherwise
    validation = Backtest(("x",), np.arange(n), truth, forecast, last, None, scale=np.ones((n, 1)))
    threshold = _calibrate_min_step(validation)[0]
    assert 0.2 < threshold <= 3.0
    held = np.where(np.abs(forecast - last) < threshold, last, forecast)
    assert np.abs(truth - held).mean() <= np.abs(truth - last).mean()
    assert np.sqrt(np.square(truth - held).mean()) < 0.5 * np.sqrt(np.square(truth - last).mean())


def test_a_failed_part_fails_the_whole_forecast():
    rng = np.random.default_rng(6)
    forecaster = forecaster_of(build_model(spec([1, 4, 1], sequence_length=5)), metadata(["a"], ["x"], 5, rng))
    runner = InferenceRunner(2)
    try:
        forecaster.warm_up(16)

        def broken(chunk):
            if len(chunk) == 1:
                raise tf.errors.InternalError(None, None, "device lost")
            return original(chunk)

        original, forecaster._call = forecaster._call, broken
        with pytest.raises(tf.errors.InternalError, match="device lost"):
            runner.forecast_async(forecaster, rng.normal(size=(17, 4, 1)).astype(np.float32)).result()  # 16 | 1
    finally:
        runner.close()


def test_xla_forecasts_match_the_plain_graph_at_every_batch_size():
    rng = np.random.default_rng(3)
    model, meta = build_model(spec([2, 5, 4, 2], sequence_length=6)), metadata(["a", "b"], ["x", "y"], 6, rng)
    xla, plain = forecaster_of(model, meta), forecaster_of(model, meta, jit_compile=False)
    for n in (1, 3, 37, 300):
        windows = rng.normal(size=(n, 5, 2)).astype(np.float32)
        np.testing.assert_allclose(xla.forecast(windows), plain.forecast(windows), rtol=1e-5, atol=1e-5)
    assert xla._xla is not None  # XLA served them, not the fallback


def test_a_failing_xla_compile_falls_back_to_the_plain_graph(caplog):
    rng = np.random.default_rng(4)
    model, meta = build_model(spec([1, 4, 1], sequence_length=5)), metadata(["a"], ["x"], 5, rng)
    forecaster = forecaster_of(model, meta)

    def unavailable(_):
        raise tf.errors.UnimplementedError(None, None, "XLA is not built into this TensorFlow")

    forecaster._xla = unavailable  # as on a platform without XLA
    windows = rng.normal(size=(4, 4, 1)).astype(np.float32)
    expected = forecaster_of(model, meta, jit_compile=False).forecast(windows)
    np.testing.assert_allclose(forecaster.forecast(windows), expected, rtol=1e-6)
    assert forecaster._xla is None and "XLA cannot compile" in caplog.text


def test_saved_metadata_is_strict_json_with_undefined_figures_as_null(tmp_path):
    import json

    from conftest import make_forecaster

    forecaster = make_forecaster().with_metadata(test={"seasonal_rmse": float("nan"), "rmse": 0.25})  # short data
    forecaster.save(tmp_path)
    text = (tmp_path / "metadata.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert saved["test"] == {"seasonal_rmse": None, "rmse": 0.25}


def window_forecaster(features=("x", "a"), targets=("x",), length=8, min_step=0.05, seed=5):
    """An untrained window-normalised forecaster with a min_step and an interval, as train writes them."""
    config = load_config(None, [f"data.features={list(features)}", f"data.targets={list(targets)}", "model.units=[6]",
                                f"model.sequence_length={length}", f"model.seed={seed}"], environ={})
    meta = {"features": list(features), "targets": list(targets), "sequence_length": length, "predict": "change",
            "normalization": {"method": "window"}, "scaled_units": True, "min_step": [min_step] * len(targets),
            "intervals": {"quantiles": [0.1, 0.9], "lower": [-0.7] * len(targets), "upper": [0.9] * len(targets),
                          "adaptation": 0.01}}
    return forecaster_of(build_model(config.model, config.layers()), meta)


@functools.cache
def equivariant() -> Forecaster:
    """Built once, when the first test asks: never at import, so collecting the tests builds no model."""
    return window_forecaster()


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**32 - 1), st.floats(-3, 3), st.floats(-50, 50), st.floats(-3, 3), st.floats(-50, 50),
       st.integers(1, 40))
def test_a_sensor_a_times_larger_and_shifted_by_b_gets_forecast_and_interval_a_f_plus_b(
        seed, log_a1, b1, log_a2, b2, n):
    rng = np.random.default_rng(seed)
    windows = np.cumsum(rng.normal(size=(n, 7, 2)), axis=1) + rng.normal(size=(1, 1, 2)) * 10
    a, b = np.array([10.0 ** log_a1, 10.0 ** log_a2]), np.array([b1, b2])
    b = b * a  # an offset as large as 50 of the sensor's own spreads
    moved = (windows * a + b).astype(np.float32)
    windows = windows.astype(np.float32)
    f, scale = equivariant().forecast_scaled(windows)
    g, moved_scale = equivariant().forecast_scaled(moved)
    np.testing.assert_allclose(moved_scale, scale * a[0], rtol=1e-4)
    # to float32's precision of the readings (the offset included), in units of the window's spread
    tolerance = 1e-4 * scale * a[0] + 1e-6 * np.abs(g)
    assert np.all(np.abs(g - (a[0] * f + b[0])) <= tolerance)
    (low, high), (moved_low, moved_high) = equivariant().bounds(f, scale), equivariant().bounds(g, moved_scale)
    assert np.all(np.abs(moved_low - (a[0] * low + b[0])) <= tolerance)
    assert np.all(np.abs(moved_high - (a[0] * high + b[0])) <= tolerance)
    assert np.all(low < f) and np.all(f < high)


def test_a_window_whose_target_is_constant_keeps_its_reading_with_no_width():
    windows = np.random.default_rng(6).normal(size=(3, 7, 2)).astype(np.float32)
    windows[:, :, 0] = 4.25
    predictions, scale = equivariant().forecast_scaled(windows)
    assert np.all(scale == 0) and np.all(predictions == 4.25)
    low, high = equivariant().bounds(predictions, scale)
    assert np.all(low == 4.25) and np.all(high == 4.25)


def test_window_min_step_is_in_units_of_the_window_spread():
    rng = np.random.default_rng(7)
    windows = np.cumsum(rng.normal(size=(200, 7, 2)), axis=1).astype(np.float32)
    free = window_forecaster(min_step=0.0)
    raw, scale = free.forecast_scaled(windows)
    last = windows[:, -1, [0]]
    steps = np.abs(raw - last) / scale
    threshold = float(np.median(steps))
    held = window_forecaster(min_step=threshold).forecast(windows)
    small = steps < threshold
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(held[small], last[small])
    np.testing.assert_allclose(held[~small], raw[~small], rtol=1e-6)


def test_spread_weights_favour_busy_windows_and_ignore_a_sensors_size():
    from stream_forecaster.training import _spread_weights, _target_spread

    rng = np.random.default_rng(8)
    quiet_then_busy = np.concatenate([rng.normal(scale=0.1, size=200), rng.normal(scale=2.0, size=200)])
    one = quiet_then_busy[:, None].astype(np.float64)
    values = np.concatenate([one, 50 * one + 7]).astype(np.float32)  # the same sensor, 50 times larger and shifted
    starts = np.concatenate([np.arange(0, 390), np.arange(400, 790)])
    weights = _spread_weights(_target_spread(values, starts, 6, [0]), starts, (0, 400))
    first, second = weights[:390], weights[390:]
    np.testing.assert_allclose(first, second, rtol=1e-4)
    assert first[300:].mean() > 5 * first[:150].mean()
    assert np.median(first) == pytest.approx(1.0, rel=1e-6)


def test_window_scaling_holds_readings_at_float32s_edge_and_tiny_steps_of_a_large_offset():
    from stream_forecaster.model import scale_windows

    inputs, spread = scale_windows(np.array([[[3e38], [-3e38], [1.0]], [[1e20], [1e20 + 1e15], [2e20]]], np.float32))
    assert np.isfinite(inputs).all() and np.isfinite(spread).all()
    np.testing.assert_allclose(inputs[0, :, 0], [1.2247449, -1.2247449, 0.0], rtol=1e-6)
    offset = np.array([[[1e6], [1e6 + 0.25], [1e6 + 0.5]]], np.float32)  # steps a millionth of the level
    inputs, spread = scale_windows(offset)
    np.testing.assert_allclose(spread, [[np.std([0.0, 0.25, 0.5])]], rtol=1e-6)
    np.testing.assert_allclose(inputs[0, :, 0], np.array([-0.5, -0.25, 0.0]) / np.std([0.0, 0.25, 0.5]), rtol=1e-6)


def test_window_scaling_keeps_steps_too_small_for_float32_squares():
    from stream_forecaster.model import scale_windows

    inputs, spread = scale_windows(np.array([[[1e-23], [2e-23], [0.0]]], np.float32))
    np.testing.assert_allclose(spread, [[np.std([1e-23, 2e-23, 0.0])]], rtol=1e-6)
    np.testing.assert_allclose(inputs[0, :, 0], [1.2247449, 2.4494898, 0.0], rtol=1e-6)
