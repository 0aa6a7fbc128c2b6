"""The stacked LSTM: build, train, forecast, save and load.

The only module that imports TensorFlow and Keras. A :class:`Forecaster` is a
Keras model plus the metadata needed to use it (features, targets, window
length, normalisation), and :meth:`Forecaster.forecast` is the one inference
path: the offline backtest and the streaming daemon both call it, so the same
window gives the same number in both.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off stderr

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .config import ModelConfig  # noqa: E402
from .errors import Interrupted, UserError  # noqa: E402
from .intervals import AdaptiveInterval  # noqa: E402
from .records import strict_json  # noqa: E402

__all__ = [
    "MODEL_FILE",
    "ModelLoadError",
    "METADATA_FILE",
    "Forecaster",
    "Scaler",
    "build_model",
    "clone_model",
    "scale_windows",
    "compile_model",
    "fit",
    "library_versions",
    "use_inference_threads",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
_executor: ThreadPoolExecutor | None = None
_executor_threads = 1
_executor_lock = threading.Lock()


def _inference_threads() -> tuple[ThreadPoolExecutor, int]:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        return _executor, _executor_threads


def use_inference_threads(count: int | None = None) -> None:
    """Forecast on ``count`` threads (None: one per CPU this process may use), each using one core,
    instead of one call spread over all cores.

    For the daemon, whose main thread parses and sends while the model computes:
    TensorFlow's default splits every op of a call over all cores, and each op
    then waits for the core the main thread holds; independent one-core calls
    fill whatever is free (6,700 against 4,800 predictions/s measured on 2 cores).
    Call it before a model is built or loaded: TensorFlow fixes its pools when it starts.
    """
    global _executor, _executor_threads
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError:  # TensorFlow is running already (a daemon inside a test): calls still overlap
        log.info("TensorFlow has started: its thread pools stay as they are")
    with _executor_lock:
        previous, _executor = _executor, ThreadPoolExecutor(count, thread_name_prefix="inference")
        _executor_threads = count
    if previous is not None:
        previous.shutdown(wait=False)  # its queued forecasts still finish


_MAX_CHUNK = 4096  # windows per compiled call (a power of _BASE); bounds the memory of one call
_BASE = 4  # batch shapes are its powers: 7 shapes to compile (powers of two made 13, and a swap took 9 s)


def _shapes(largest: int) -> list[int]:
    """The batch shapes up to ``largest`` windows, smallest first."""
    shapes = [1]
    while shapes[-1] * _BASE <= min(largest, _MAX_CHUNK):
        shapes.append(shapes[-1] * _BASE)
    return shapes


def _pieces(n: int) -> list[int]:
    """``n`` windows as a sum of batch shapes, largest first: no padding, at most 3 of a shape but the largest."""
    pieces = []
    for size in reversed(_shapes(_MAX_CHUNK)):
        pieces += [size] * (n // size)
        n %= size
    return pieces


def _plain_pieces(n: int) -> list[int]:
    return [min(_MAX_CHUNK, n - start) for start in range(0, n, _MAX_CHUNK)]


_CALL_COST = 7  # a compiled call's fixed cost, in windows (about 1 ms against 0.14 ms a window on one core)


def _parts(pieces: list[int], threads: int) -> list[int]:
    """Window counts of up to ``threads`` consecutive runs of ``pieces``, of about equal cost.

    A small batch cut into several calls then finishes in the time of its
    largest run instead of all of them one after the other (latency at light load).
    """
    total = sum(size + _CALL_COST for size in pieces)
    parts, run, cost = [], 0, 0
    for size in pieces:
        if run and len(parts) < threads - 1 and cost + (size + _CALL_COST) / 2 > total / threads * (len(parts) + 1):
            parts.append(run)
            run = 0
        run += size
        cost += size + _CALL_COST
    return parts + [run]


def _gather(futures: list[Future]) -> Future:
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


class ModelLoadError(UserError):
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
    keras.utils.set_random_seed(config.seed)
    width_in, *lstm_sizes, width_out = layers or config.layers
    layers: list = [keras.Input(shape=(config.sequence_length - 1, width_in), name="window")]
    for i, units in enumerate(lstm_sizes):
        layers.append(keras.layers.LSTM(units, return_sequences=i < len(lstm_sizes) - 1))
        layers.append(keras.layers.Dropout(config.dropout))
    layers.append(keras.layers.Dense(width_out, activation="linear", name="forecast"))
    model = keras.Sequential(layers, name="stacked_lstm")
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

    def __init__(self, model: keras.Model, metadata: dict, version: str | None = None, jit_compile: bool = True):
        self.model = model
        self.metadata = metadata
        self.version = version
        self.features: tuple[str, ...] = tuple(metadata["features"])
        self.targets: tuple[str, ...] = tuple(metadata["targets"])
        self.sequence_length: int = int(metadata["sequence_length"])
        norm = metadata["normalization"]
        self.normalization: str = norm.get("method") or "standardize"  # versions before methods were recorded
        self.windowed = self.normalization == "window"
        # where each target's last reading sits among the features (None when a target is not a feature)
        self._last = ([self.features.index(t) for t in self.targets]
                      if set(self.targets) <= set(self.features) else None)
        if self.windowed:
            self.feature_scaler = self.target_scaler = None
        else:
            self.feature_scaler = Scaler.from_dict(norm["features"])
            self.target_scaler = Scaler.from_dict(norm["targets"])
        self._change = self.windowed or metadata.get("predict") == "change"  # the output is the step from the last reading
        # Versions written before scales were recorded give min_step and offsets in data units
        to_scale = 1.0 if self.windowed or metadata.get("scaled_units") else 1.0 / self.target_scaler.scale
        self._min_step = np.asarray(metadata["min_step"], np.float64) * to_scale if metadata.get("min_step") else None
        intervals = metadata.get("intervals") or {}
        self.interval = AdaptiveInterval(
            intervals["quantiles"], np.asarray(intervals["lower"]) * to_scale, np.asarray(intervals["upper"]) * to_scale,
            intervals.get("adaptation", 0.0)) if intervals else None
        self.interval_quantiles: tuple[float, ...] = self.interval.quantiles if self.interval else ()
        spec = tf.TensorSpec([None, self.sequence_length - 1, len(self.features)], tf.float32)
        # One traced graph for any batch size: no per-call retracing, no model.predict overhead.
        self._graph = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        # XLA fuses each LSTM step's kernels: 1.4x (large batches) to 3x (one window) the plain graph on CPU.
        # It compiles once per batch shape, so batches are cut into a few shapes (see _pieces).
        self._xla = tf.function(lambda x: self.model(x, training=False), input_signature=[spec],
                                jit_compile=True) if jit_compile else None

    def mismatch(self, config) -> str | None:
        """How this model's columns and window differ from what ``config`` asks for, or None if they agree."""
        d, m = config.data, config.model
        have = (self.features, self.targets, self.sequence_length)
        wanted = (tuple(d.features), tuple(d.targets), m.sequence_length)
        if have == wanted:
            return None
        return (f"model {self.version} reads {', '.join(have[0])} -> {', '.join(have[1])} with windows of {have[2]}; "
                f"the configuration asks for {', '.join(wanted[0])} -> {', '.join(wanted[1])} with {wanted[2]}")

    def warm_up(self, largest: int = 1) -> None:
        """Trace and compile the call for every batch shape up to ``largest`` windows, so no real batch waits."""
        for size in _shapes(largest):
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
        if self.windowed:
            inputs, spread = scale_windows(windows)
            scale = spread[:, self._last]
        else:
            inputs = self.feature_scaler.transform(windows)
            scale = np.broadcast_to(self.target_scaler.scale.astype(np.float64), (len(windows), len(self.targets)))
        out = np.empty((len(windows), len(self.targets)), dtype=np.float32)
        start = 0
        for size in self._calls(len(windows)):
            out[start:start + size] = self._call(inputs[start:start + size])
            start += size
        if self._last is None:  # a level model of targets it does not read
            return self.target_scaler.inverse(out), scale
        last = windows[:, -1, self._last].astype(np.float64)
        step = out.astype(np.float64) if self._change else (self.target_scaler.inverse(out) - last) / scale
        if self._min_step is not None:
            # a forecast step smaller than min_step is noise more often than not: keep the last reading
            step[np.abs(step) < self._min_step] = 0.0
        with np.errstate(over="ignore", invalid="ignore"):  # readings near float32's limit: not finite, published null
            return (last + step * scale).astype(np.float32), scale

    def _calls(self, n: int) -> list[int]:
        """The window counts of the compiled calls that forecast ``n`` windows."""
        return _pieces(n) if self._xla is not None else _plain_pieces(n)

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
        return None if self.interval is None else self.interval.bounds(predictions, scale)

    def forecast_async(self, windows: np.ndarray) -> Future:
        """:meth:`forecast_scaled` on an inference thread: a future of ``(predictions, scale, seconds it took)``.

        Leave ``windows`` untouched until the result is in. TensorFlow releases
        the GIL while it computes, so the caller's Python work (parsing the next
        readings, publishing the last forecasts) runs meanwhile. The threads
        (one unless :func:`use_inference_threads` says more) serve every forecaster.
        A batch cut into several calls is shared among them in consecutive runs:
        26 windows took 6.6 ms on one thread and 5.4 ms on two (latency at light load).
        """
        def timed(part):
            started = time.perf_counter()
            predictions, scale = self.forecast_scaled(part)
            return predictions, scale, time.perf_counter() - started

        executor, threads = _inference_threads()
        futures, start = [], 0
        for size in _parts(self._calls(len(windows)), threads):
            futures.append(executor.submit(timed, windows[start:start + size]))
            start += size
        return _gather(futures)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the Keras file and the metadata into an existing directory."""
        directory = Path(directory)
        self.model.save(directory / MODEL_FILE)
        (directory / METADATA_FILE).write_text(strict_json(self.metadata, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike, version: str | None = None, jit_compile: bool = True) -> "Forecaster":
        """Load a ``.keras`` file (``safe_mode=True``: no arbitrary code) and its metadata.

        Check the version's checksums first (``ModelStore.verify``). Anything
        unusable raises :class:`ModelLoadError` naming the directory.
        """
        directory = Path(directory)
        try:
            metadata = json.loads((directory / METADATA_FILE).read_text())
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
