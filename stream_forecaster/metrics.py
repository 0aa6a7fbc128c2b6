"""Prometheus metrics and the HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``.

The only module that imports prometheus_client. Every metric is created on the
registry passed in, so tests build a fresh registry and read values back.
There is no per-sensor label unless a sensor is listed in
``metrics.labelled_sensors``: one label value per sensor would overwhelm
Prometheus at fleet scale.
"""

from __future__ import annotations

import functools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from .errors import UserError

__all__ = ["BulkHistogram", "Metrics", "MetricsServer", "RetrainMetrics", "new_registry", "scrape"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The daemon's metrics, all prefixed ``stream_forecaster_``."""

    def __init__(self, targets: Sequence[str], labelled_sensors: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        readings = Counter("stream_forecaster_readings", "Input messages by outcome: accepted, missing "
                           "('?' or a feature absent), invalid, ignored (UCI header lines), stale (not newer than "
                           "the sensor's last reading: a repeat, or late)", ["outcome"], registry=r)
        self.accepted, self.missing = readings.labels("accepted"), readings.labels("missing")
        self.invalid, self.ignored = readings.labels("invalid"), readings.labels("ignored")
        self.stale = readings.labels("stale")
        self.predictions = Counter("stream_forecaster_predictions", "Predictions published", registry=r)
        self.scored = Counter("stream_forecaster_scored_predictions",
                              "Predictions scored against the reading they predicted", registry=r)
        self.dead_letters = Counter("stream_forecaster_dead_letters",
                                    "Invalid messages forwarded to the dead-letter topic", registry=r)
        self.producer_recreations = Counter("stream_forecaster_producer_recreations",
                                            "Kafka producers replaced after repeated failures", registry=r)
        self.publish_retries = Counter("stream_forecaster_publish_retries",
                                       "Publish attempts that failed and were retried", registry=r)
        self.refused_records = Counter("stream_forecaster_refused_records",
                                       "Records the broker refused for themselves (too large), left out", registry=r)
        abs_error = BulkHistogram("stream_forecaster_prediction_abs_error",
                                  "Absolute error of scored predictions, in the target's units",
                                  (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100), ["target"],
                                  registry=r)
        self.abs_error = [abs_error.labels(t) for t in targets]
        self.rolling_mae = Gauge("stream_forecaster_rolling_mae", "Mean absolute error over the last "
                                 "metrics.rolling_window scored predictions", ["target", "forecaster"], registry=r)
        self.rolling_rmse = Gauge("stream_forecaster_rolling_rmse", "Root mean squared error over the last "
                                  "metrics.rolling_window scored predictions", ["target", "forecaster"], registry=r)
        self.sensor_abs_error = Gauge("stream_forecaster_sensor_abs_error",
                                      "Absolute error of the last scored prediction of a labelled sensor",
                                      ["sensor", "target"], registry=r)
        self.labelled_sensors = frozenset(labelled_sensors)
        self.inference_seconds = Histogram("stream_forecaster_batch_inference_seconds",
                                           "Time to forecast one chunk of a batch (up to 1,024 windows)",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.latency_seconds = BulkHistogram("stream_forecaster_reading_to_published_seconds",
                                             "From a reading's Kafka timestamp to its prediction acknowledged",
                                             _LATENCY_BUCKETS, registry=r).labels()
        self.batch_size = Histogram("stream_forecaster_batch_readings", "Messages handled per poll batch",
                                    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000), registry=r)
        self.active_sensors = Gauge("stream_forecaster_active_sensors", "Sensors with a window", registry=r)
        self.anomalies = Counter("stream_forecaster_anomalies", "Readings outside their forecast's anomaly band "
                                 "(model.anomaly_quantiles)", registry=r)
        self.gaps = Counter("stream_forecaster_gaps", "Runs of at least window.min_gap missing readings of one sensor",
                            registry=r)
        shadow = Counter("stream_forecaster_shadow_decisions", "Shadow candidates promoted (beat the serving model "
                         "and persistence on live readings) or dropped", ["decision"], registry=r)
        self.shadow_decisions = {d: shadow.labels(d) for d in ("promoted", "dropped")}
        self.shadow_scored = Counter("stream_forecaster_shadow_scored_predictions",
                                     "Forecasts of the shadow candidate scored against the readings", registry=r)
        self.shadow_version = Gauge("stream_forecaster_shadow_version",
                                    "Version number of the candidate forecasting in shadow (0: none)", registry=r)
        self.health_records = Counter("stream_forecaster_health_records",
                                      "Per-sensor health records written to kafka.health_topic", registry=r)
        self.health_sensors = Gauge("stream_forecaster_health_sensors", "Sensors whose skill counts in the "
                                    "distribution gauges (at least 10 scored forecasts)", registry=r)
        self.worse_than_persistence = Gauge("stream_forecaster_sensors_worse_than_persistence_ratio",
                                            "Share of those sensors whose rolling RMSE is above persistence's",
                                            registry=r)
        self.sensor_skill = Gauge("stream_forecaster_sensor_skill", "Quantiles across sensors of each sensor's skill "
                                  "against persistence (1 - RMSE / persistence's RMSE; its worst target)",
                                  ["quantile"], registry=r)
        self.rebuilt = Counter("stream_forecaster_rebuilt_readings",
                               "Earlier readings replayed to refill windows after a restart or a new partition",
                               registry=r)
        self.rebuilding = Gauge("stream_forecaster_rebuilding_partitions",
                                "Partitions whose windows are being refilled (not ready meanwhile)", registry=r)
        self.evicted = Counter("stream_forecaster_evicted_sensors",
                               "Windows dropped after window.idle_ttl without a reading", registry=r)
        self.consumer_lag = Gauge("stream_forecaster_consumer_lag",
                                  "Readings in the input topic not yet consumed (sum over partitions)", registry=r)
        self.model_version = Gauge("stream_forecaster_model_version", "Version number of the model serving",
                                   registry=r)
        self.model_created = Gauge("stream_forecaster_model_created_timestamp_seconds",
                                   "When the model serving was trained (Unix time)", registry=r)
        self.interval_coverage = Gauge("stream_forecaster_rolling_interval_coverage",
                                       "Share of the last metrics.rolling_window scored readings inside the "
                                       "published prediction interval", ["target"], registry=r)
        self.ready = Gauge("stream_forecaster_ready", "1 when ready (as /readyz), read at each scrape", registry=r)
        self.last_poll = Gauge("stream_forecaster_last_poll_timestamp_seconds",
                               "When the poll loop last got an answer from Kafka (stale: the loop is stuck)",
                               registry=r)
        swaps = Counter("stream_forecaster_model_swaps", "New current model versions: swapped in, or refused "
                        "(corrupted, incompatible or unloadable; the old one keeps serving)", ["outcome"], registry=r)
        self.swapped, self.swap_refused = swaps.labels("swapped"), swaps.labels("refused")

    def bind_rolling(self, targets: Sequence[str], model, baseline, coverage=None) -> None:
        """Rolling gauges read from :class:`~stream_forecaster.scoring.RollingErrors` at scrape time."""
        for i, target in enumerate(targets):
            if coverage is not None:
                self.interval_coverage.labels(target).set_function(functools.partial(coverage.mae, i))
            for name, errors in (("model", model), ("persistence", baseline)):
                self.rolling_mae.labels(target, name).set_function(functools.partial(errors.mae, i))
                self.rolling_rmse.labels(target, name).set_function(functools.partial(errors.rmse, i))


class BulkHistogram:
    """A histogram observed an array at a time: one lock and one pass of numpy per batch, where
    ``Histogram.observe`` takes a lock per value. Exposed as prometheus_client's histograms are."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = np.array(sorted(float(b) for b in buckets if b != float("inf")))
        self._children: dict[tuple[str, ...], _BulkSeries] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> "_BulkSeries":
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, got {values}")
        with self._lock:
            return self._children.setdefault(tuple(values), _BulkSeries(self._bounds, self._lock))

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(labels, s.counts.cumsum().tolist(), s.total) for labels, s in self._children.items()]
        edges = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        for labels, cumulative, total in series:
            family.add_metric(list(labels), list(zip(edges, cumulative)), total)
        yield family


class _BulkSeries:
    """One label set's counts of a :class:`BulkHistogram`."""

    def __init__(self, bounds: np.ndarray, lock: threading.Lock):
        self._bounds, self._lock = bounds, lock
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0

    def observe_many(self, values) -> None:
        """Observe every value of ``values`` (finite numbers)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not len(values):
            return
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self.counts))
        total = float(values.sum())
        with self._lock:
            self.counts += counts
            self.total += total

    def observe(self, value: float) -> None:
        self.observe_many([value])


class RetrainMetrics:
    """The retrainer's metrics, all prefixed ``stream_forecaster_retrain_``."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        runs = Counter("stream_forecaster_retrain_runs", "Retraining cycles by outcome: published, rejected "
                       "(by the validation gate), failed", ["outcome"], registry=r)
        self.runs = {o: runs.labels(o) for o in ("published", "rejected", "failed")}
        self.duration = Histogram("stream_forecaster_retrain_duration_seconds", "Time of one retraining cycle",
                                  buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200), registry=r)
        self.error = Gauge("stream_forecaster_retrain_error", "Gate error (retrain.metric) on the latest "
                           "held-out slice", ["model"], registry=r)
        self.last_run = Gauge("stream_forecaster_retrain_last_run_timestamp_seconds",
                              "When the latest cycle ended, by outcome", ["outcome"], registry=r)
        starts = Counter("stream_forecaster_retrain_starts", "Retraining cycles started, by why: schedule "
                         "(retrain.every) or skill (the fleet's live skill below retrain.trigger_skill)", ["reason"],
                         registry=r)
        self.starts = {reason: starts.labels(reason) for reason in ("schedule", "skill")}
        self.fleet_skill = Gauge("stream_forecaster_retrain_fleet_skill", "The fleet's median skill against "
                                 "persistence, as the retrainer last read it from kafka.health_topic", registry=r)


def new_registry() -> CollectorRegistry:
    """A registry holding only the process's own metrics, for the daemon or the retrainer to add theirs to.

    ``process_*`` (resident memory, CPU seconds, open files, start time; read
    from /proc at each scrape, so absent off Linux) and ``python_info``: a
    memory leak or a stuck CPU shows on /metrics without a node exporter. The
    daemon serves it before the metrics that need its model exist.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsServer:
    """``/metrics``, ``/healthz`` (the process is alive) and ``/readyz`` (``is_ready()``) on a thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, is_ready: Callable[[], bool]):
        handler = _handler(registry, is_ready)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:  # a port in use (a second daemon), an address not on this host
            raise UserError(f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; choose another "
                            "host or port (port 0 takes any free one)") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: CollectorRegistry, is_ready: Callable[[], bool]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ready = is_ready()
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    return Handler


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Samples of a ``/metrics`` endpoint as ``{'name{label="v",...}': value}`` (labels sorted)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples
