"""The stacked LSTM: build, train, forecast, save and load.

The only module that imports TensorFlow and Keras. A :class:`Forecaster` is a
Keras model plus its :class:`~stream_forecaster.store.ModelMetadata` (features,
targets, window length, normalisation), and :meth:`Forecaster.forecast` is the
one inference path: the offline backtest and the streaming daemon both call it,
so the same window gives the same number in both.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .logs import quiet_native

quiet_native()  # before TensorFlow loads, whoever imports this module first: it reads the level once

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .config import ModelConfig  # noqa: E402
from .errors import Interrupted  # noqa: E402
from .files import strict_json  # noqa: E402
from .inference import batch_shapes, compiled_pieces, plain_pieces  # noqa: E402
from .intervals import AdaptiveInterval, AnomalyBand  # noqa: E402
from .store import METADATA_FILE, MODEL_FILE, ModelMetadata, ModelStoreError  # noqa: E402

__all__ = [
    "Forecaster",
    "ModelLoadError",
    "Scaler",
    "build_model",
    "clone_model",
    "compile_model",
    "fit",
    "library_versions",
    "scale_windows",
    "use_tensorflow_threads",
]

log = logging.getLogger(__name__)


def use_tensorflow_threads(count: int) -> None:
    """Let TensorFlow run ``count`` calls at once, each on one core, instead of one call spread over all cores.

    For the daemon, whose main thread parses and sends while the model computes
    (see :class:`~stream_forecaster.inference.InferenceRunner`): TensorFlow's
    default splits every op of a call over all cores, and each op then waits for
    the core the main thread holds; independent one-core calls fill whatever is
    free. Call it before a model is built or loaded: TensorFlow fixes its pools
    when it starts.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError:  # TensorFlow is running already (a daemon inside a test): calls still overlap
        log.info("TensorFlow has started: its thread pools stay as they are")


class ModelLoadError(ModelStoreError):
    """A model version that is present but cannot be used."""


@dataclass(frozen=True)
class Scaler:
    """Per-column affine normalisation: ``(x - mean) / scale``."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray, method: str) -> "Scaler":
        mean = values.mean(axis=0, dtype=np.float64)
        if method == "center":
            scale = np.ones_like(mean)
        elif method == "standardize":
            scale = values.std(axis=0, dtype=np.float64)
            scale[~(scale > 0)] = 1.0  # a constant column stays merely centred
        else:
            raise ValueError(f"unknown normalisation {method!r}; use center or standardize")
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # readings near float32's limit: their forecast is not finite, published null
            return ((values - self.mean) / self.scale).astype(np.float32, copy=False)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.scale + self.mean

    def subset(self, index: Sequence[int]) -> "Scaler":
        return Scaler(self.mean[list(index)], self.scale[list(index)])

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "Scaler":
        return cls(np.asarray(data["mean"], np.float32), np.asarray(data["scale"], np.float32))


def build_model(config: ModelConfig, layers: Sequence[int] | None = None) -> keras.Model:
    """Stacked LSTM from ``layers = [inputs, lstm..., outputs]`` (``Config.layers()``; default ``config.layers``).

    Every LSTM but the last returns sequences so the next one can read them;
    dropout follows each LSTM; a linear Dense layer gives the outputs.
    """
    widths = layers or config.layers
    if widths is None:
        raise ValueError("no layer widths: pass Config.layers(), which follows the data's columns")
    keras.utils.set_random_seed(config.seed)
    width_in, *lstm_sizes, width_out = widths
    stack: list = [keras.Input(shape=(config.sequence_length - 1, width_in), name="window")]
    for i, units in enumerate(lstm_sizes):
        stack.append(keras.layers.LSTM(units, return_sequences=i < len(lstm_sizes) - 1))
        stack.append(keras.layers.Dropout(config.dropout))
    stack.append(keras.layers.Dense(width_out, activation="linear", name="forecast"))
    model = keras.Sequential(stack, name="stacked_lstm")
    compile_model(model, config)
    return model


def clone_model(model: keras.Model, config: ModelConfig) -> keras.Model:
    """A trainable copy of ``model`` with its weights, compiled per ``config`` (for fine-tuning)."""
    keras.utils.set_random_seed(config.seed)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    compile_model(copy, config)
    return copy


def compile_model(model: keras.Model, config: ModelConfig) -> None:
    optimizers = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    losses = {"mse": "mse", "mae": "mae", "huber": keras.losses.Huber()}
    model.compile(optimizer=optimizers[config.optimizer](learning_rate=config.learning_rate), loss=losses[config.loss])


def scale_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[n, length, columns]`` in units of their own readings: ``(x - last) / s`` and ``s`` ``[n, columns]``.

    ``s`` is each column's standard deviation over the window, and 0 for a
    column constant in it (its inputs are then 0). ``a·x + b`` (``a > 0``)
    gives the same inputs and ``a·s``: whatever a sensor's size and units, the
    network sees the shape of its recent readings, and a forecast made in
    units of ``s`` scales back with the sensor (as in RevIN and DeepAR).
    """
    windows = np.asarray(windows, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        # centred on the last reading first: the steps of a large offset survive in float32, at a third of
        # float64's cost
        steps = windows - windows[:, -1:, :]
        spread = np.sqrt(np.square(steps - steps.mean(axis=1, keepdims=True)).mean(axis=1)).astype(np.float64)
        constant = (steps == 0).all(axis=1)  # exactly: an affine map keeps a constant column constant
        spread[constant] = 0.0
        inputs = steps * (1.0 / np.where(spread > 0, spread, 1.0)).astype(np.float32)[:, None, :]
        # steps whose squares float32 cannot hold (beyond 1e±19, or summed over a long window): again, in float64
        # and in units of each column's largest step
        odd = ~constant & ~((1e-15 < spread) & (spread < 1e15))
        if odd.any():
            rows = np.flatnonzero(odd.any(axis=1))
            precise = windows[rows].astype(np.float64)
            precise -= precise[:, -1:, :]
            unit = np.abs(precise).max(axis=1, keepdims=True)
            unit[unit == 0] = 1.0
            spread[rows] = (precise / unit).std(axis=1) * unit[:, 0, :]
            inputs[rows] = precise / np.where(spread[rows] > 0, spread[rows], 1.0)[:, None, :]
    return inputs, spread


class _Windows(keras.utils.PyDataset):
    """Batches gathered from a window view by index, so only a batch is ever copied.

    ``scaled``: the view holds raw readings and each window is scaled by its own
    (:func:`scale_windows`), the target being the step in units of the window's
    spread; otherwise the view is globally normalised already.
    """

    def __init__(self, windows, indices, feature_index, target_index, batch_size, shuffle_seed=None,
                 change=False, scaled=False, weights=None):
        super().__init__()
        self.change, self.scaled = change, scaled
        self.windows, self.indices = windows, np.asarray(indices)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.feature_index, self.target_index = list(feature_index), list(target_index)
        self.last_index = [self.feature_index.index(t) for t in self.target_index] if scaled else None
        self.batch_size = batch_size
        self.rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self.order = np.arange(len(self.indices))  # positions in indices (and weights)
        self.on_epoch_end()

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, i):
        rows = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        chosen = self.windows[self.indices[rows]]
        inputs = chosen[:, :-1][:, :, self.feature_index]
        target = chosen[:, -1][:, self.target_index]
        if self.scaled:
            inputs, spread = scale_windows(inputs)
            scale = spread[:, self.last_index]
            step = target - chosen[:, -2][:, self.target_index]
            target = (step / np.where(scale > 0, scale, 1.0)).astype(np.float32)
        elif self.change:
            target = target - chosen[:, -2][:, self.target_index]
        return (inputs, target) if self.weights is None else (inputs, target, self.weights[rows])

    def on_epoch_end(self):
        if self.rng is not None:
            self.rng.shuffle(self.order)


class _StopWhenSet(keras.callbacks.Callback):
    """Ends training after the current batch once ``event`` is set (a signal handler sets it)."""

    def __init__(self, event):
        super().__init__()
        self.event = event

    def on_train_batch_end(self, batch, logs=None):
        if self.event.is_set():
            self.model.stop_training = True


def fit(
    model: keras.Model,
    windows: np.ndarray,
    train_indices: np.ndarray,
    validation_indices: np.ndarray,
    feature_index: Sequence[int],
    target_index: Sequence[int],
    config: ModelConfig,
    verbose: int | str = "auto",
    stop=None,
    scaled: bool = False,
    weights: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Train on normalised ``windows[train_indices]`` (shuffled each epoch).

    Returns Keras' history. ``validation_indices`` are scored, unshuffled,
    after each epoch when not empty; with ``config.patience`` training stops
    once that many epochs pass without a better validation loss, and the best
    weights are kept. With ``config.predict == "change"`` the model learns the
    step from the last reading rather than the next level; with ``scaled`` the
    windows are raw readings, each scaled by its own (:func:`scale_windows`). ``weights``
    (training, validation) weigh each window's loss. Setting the ``stop`` event ends training
    after the current batch and raises :class:`~stream_forecaster.errors.Interrupted`.
    """
    change = config.predict == "change"
    train_weights, validation_weights = weights or (None, None)
    train = _Windows(windows, train_indices, feature_index, target_index, config.batch_size, config.seed, change,
                     scaled, train_weights)
    validation = None
    if len(validation_indices):
        validation = _Windows(windows, validation_indices, feature_index, target_index, config.batch_size,
                              change=change, scaled=scaled, weights=validation_weights)
    callbacks = [_StopWhenSet(stop)] if stop is not None else []
    if config.patience and validation is not None:
        callbacks.append(keras.callbacks.EarlyStopping(patience=config.patience, restore_best_weights=True))
    history = model.fit(train, validation_data=validation, epochs=config.epochs, verbose=verbose, callbacks=callbacks)
    if stop is not None and stop.is_set():
        raise Interrupted("training stopped on request")
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


class Forecaster:
    """A trained model with what it takes to feed it and read its output.

    Two normalisations: ``window`` (each window in units of its own readings,
    :func:`scale_windows`; the model predicts the step in those units, so one
    model serves sensors of any size) and the global ones of the tutorials
    (``center``, ``standardize``: the training data's mean and spread). Either
    way every forecast has a *scale* per target, the unit in which
    ``min_step`` and the interval's offsets are given: the window's spread, or
    the global one.
    """

    def __init__(self, model: keras.Model, metadata: ModelMetadata, version: str | None = None,
                 jit_compile: bool = True):
        self.model = model
        self.metadata = metadata
        self.version = version
        self.features, self.targets = metadata.features, metadata.targets
        self.sequence_length = metadata.sequence_length
        self.normalization = metadata.method
        self.windowed = self.normalization == "window"
        # where each target's last reading sits among the features (None when a target is not a feature)
        self._last = ([self.features.index(t) for t in self.targets]
                      if set(self.targets) <= set(self.features) else None)
        # the global normalisations' scalers; None for window normalisation
        self.feature_scaler: Scaler | None = None
        self.target_scaler: Scaler | None = None
        if not self.windowed:
            self.feature_scaler = Scaler.from_dict(metadata.normalization["features"])
            self.target_scaler = Scaler.from_dict(metadata.normalization["targets"])
        self._change = self.windowed or metadata.predict == "change"  # the output is the step from the last reading
        # Versions written before scales were recorded give min_step and offsets in data units
        to_scale = (1.0 if self.target_scaler is None or metadata.scaled_units
                    else 1.0 / self.target_scaler.scale)
        self._min_step = np.asarray(metadata.min_step, np.float64) * to_scale if metadata.min_step else None
        intervals = metadata.intervals or {}
        self.prediction_interval = AdaptiveInterval(
            intervals["quantiles"], np.asarray(intervals["lower"]) * to_scale,
            np.asarray(intervals["upper"]) * to_scale,
            intervals.get("adaptation", 0.0)) if intervals else None
        self.interval_quantiles: tuple[float, ...] = (self.prediction_interval.quantiles
                                                      if self.prediction_interval else ())
        self.anomaly_band = AnomalyBand.from_dict(metadata.anomaly, to_scale) if metadata.anomaly else None
        spec = tf.TensorSpec([None, self.sequence_length - 1, len(self.features)], tf.float32)
        # One traced graph for any batch size: no per-call retracing, no model.predict overhead.
        self._graph = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        # XLA fuses each LSTM step's kernels: 1.4x (large batches) to 3x (one window) the plain graph on CPU.
        # It compiles once per batch shape, so batches are cut into a few shapes, the last call padded
        # (see inference.compiled_pieces).
        self._xla = tf.function(lambda x: self.model(x, training=False), input_signature=[spec],
                                jit_compile=True) if jit_compile else None

    def warm_up(self, largest: int = 1) -> None:
        """Trace and compile the call for every batch shape up to ``largest`` windows, so no real batch waits."""
        for size in batch_shapes(largest):
            self.forecast(np.zeros((size, self.sequence_length - 1, len(self.features)), dtype=np.float32))

    def forecast(self, windows: np.ndarray) -> np.ndarray:
        """Predictions ``[n, targets]`` in data units for input windows ``[n, sequence_length - 1, features]``."""
        return self.forecast_scaled(windows)[0]

    def forecast_scaled(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predictions, scale)``, both ``[n, targets]``: :meth:`forecast` and the unit of each forecast."""
        windows = np.asarray(windows)
        expected = (self.sequence_length - 1, len(self.features))
        if windows.ndim != 3 or windows.shape[1:] != expected:
            raise ValueError(f"expected windows of shape [n, {expected[0]}, {expected[1]}], got {windows.shape}")
        target_scaler = self.target_scaler
        if self.feature_scaler is None or target_scaler is None:  # window normalisation
            inputs, spread = scale_windows(windows)
            scale = spread[:, self._last]
        else:
            inputs = self.feature_scaler.transform(windows)
            scale = np.broadcast_to(target_scaler.scale.astype(np.float64), (len(windows), len(self.targets)))
        out = np.empty((len(windows), len(self.targets)), dtype=np.float32)
        start = 0
        for size in self.calls(len(windows)):
            chunk = inputs[start:start + size]
            if len(chunk) < size:  # the last call, padded to its compiled shape
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out[start:start + size] = self._call(chunk)[:len(out) - start]
            start += size
        if self._last is None:  # a level model of targets it does not read (global normalisation only)
            assert target_scaler is not None
            return target_scaler.inverse(out), scale
        last = windows[:, -1, self._last].astype(np.float64)
        if self._change:
            step = out.astype(np.float64)
        else:
            assert target_scaler is not None  # window normalisation always predicts the step
            step = (target_scaler.inverse(out) - last) / scale
        if self._min_step is not None:
            # a forecast step smaller than min_step is noise more often than not: keep the last reading
            step[np.abs(step) < self._min_step] = 0.0
        with np.errstate(over="ignore", invalid="ignore"):  # readings near float32's limit: not finite, published null
            return (last + step * scale).astype(np.float32), scale

    def with_metadata(self, **changes) -> "Forecaster":
        """This model with its metadata changed (calibration, the retrainer's gate)."""
        return Forecaster(self.model, self.metadata.replace(**changes), self.version, self._xla is not None)

    def calls(self, n: int) -> list[int]:
        """The window counts of the compiled calls that forecast ``n`` windows."""
        return compiled_pieces(n) if self._xla is not None else plain_pieces(n)

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        if self._xla is not None:
            try:
                return self._xla(chunk).numpy()
            except tf.errors.OpError as exc:  # no XLA for this platform or model: the plain graph still works
                log.warning("XLA cannot compile the model here (%s); using the plain graph, about 1.4x slower "
                            "(set model.jit_compile: false to skip this attempt)", str(exc).splitlines()[0])
                self._xla = None
        return self._graph(chunk).numpy()

    def bounds(self, predictions: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Lower and upper bounds around ``predictions`` at :attr:`interval_quantiles`, or None.

        Offsets in units of each forecast's ``scale`` (from :meth:`forecast_scaled`),
        calibrated on the validation slice after training and tracked online
        (:class:`~stream_forecaster.intervals.AdaptiveInterval`).
        """
        return None if self.prediction_interval is None else self.prediction_interval.bounds(predictions, scale)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the Keras file and the metadata into an existing directory."""
        directory = Path(directory)
        self.model.save(directory / MODEL_FILE)
        (directory / METADATA_FILE).write_text(strict_json(self.metadata.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, version: str | None = None, jit_compile: bool = True) -> "Forecaster":
        """Load a ``.keras`` file (``safe_mode=True``: no arbitrary code) and its metadata.

        Check the version's checksums first (``ModelStore.verify``). Anything
        unusable raises :class:`ModelLoadError` naming the directory.
        """
        directory = Path(directory)
        try:
            metadata = ModelMetadata.from_dict(json.loads((directory / METADATA_FILE).read_text()))
            model = keras.models.load_model(directory / MODEL_FILE, compile=False, safe_mode=True)
            return cls(model, metadata, version, jit_compile)
        except Exception as exc:  # Keras raises many kinds on a damaged file; all mean "unusable"
            raise ModelLoadError(f"{directory}: cannot load the model: {type(exc).__name__}: {exc}") from None


def library_versions() -> dict:
    from . import __version__

    return {
        "stream_forecaster": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
