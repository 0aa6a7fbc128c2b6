"""The daemon: wiring, the poll loop, signals and shutdown.

Shaped like huey's consumer: ``initialize`` / ``loop`` / ``shutdown`` around one
stop event. Signal handlers only set that event; the loop checks it between
batches, so SIGTERM finishes the batch in hand, publishes and commits it, and
exits 0 within about one poll timeout plus one batch.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import threading
import time

from . import __version__
from .config import Config
from .metrics import Metrics, MetricsServer, new_registry
from .pipeline import CHUNK, Pipeline, Stopped
from .recovery import Recovery
from .registry import ModelStore, ModelStoreError

__all__ = ["Daemon", "ModelWatcher"]

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.5
GAUGE_INTERVAL_S = 1.0


class ModelWatcher:
    """Watches the store on its own thread; a new current version is loaded, checked and warmed there.

    The poll loop only ever calls :meth:`take` between two batches, so loading
    and tracing a model never stalls inference, and a batch is never split
    between two models.
    """

    def __init__(self, store: ModelStore, serving, interval: float, stop: threading.Event, metrics: Metrics,
                 jit_compile: bool = True):
        self.store, self.interval, self.stop, self.metrics = store, interval, stop, metrics
        self.jit_compile = jit_compile
        self.serving = serving
        self._seen = serving.version
        self._ready = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> "ModelWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 (the thread must outlive any surprise, or hot swaps end for good)
                log.exception("checking the model store failed; trying again in %.0f s", self.interval)

    def check(self) -> None:
        """Load the current version if it is new; refuse it (logged, counted) if it does not fit."""
        try:
            version = self.store.current()
        except (OSError, ModelStoreError) as exc:  # checked again next poll: fixing the pointer is enough
            log.warning("cannot read the model store pointer: %s", exc)
            return
        if version is None or version == self._seen:
            return
        self._seen = version
        from .model import Forecaster  # noqa: PLC0415

        try:
            directory = self.store.verify(self.store.directory(version))
            candidate = Forecaster.load(directory, version, self.jit_compile)
            served = (self.serving.features, self.serving.targets, self.serving.sequence_length)
            offered = (candidate.features, candidate.targets, candidate.sequence_length)
            if offered != served:
                raise ValueError(f"it maps {offered[0]} -> {offered[1]} with windows of {offered[2]}, "
                                 f"the daemon serves {served[0]} -> {served[1]} with windows of {served[2]}")
            candidate.warm_up(CHUNK)
        except Exception as exc:  # a bad version must never take the daemon down
            self.metrics.swap_refused.inc()
            log.error("refusing model version %s: %s; still serving version %s", version, exc, self.serving.version)
            return
        with self._lock:
            self._ready = candidate

    def take(self):
        """The loaded new forecaster, once, or None."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self.serving = ready
        return ready


class Daemon:
    """``stream-forecaster run``: Kafka in, forecasts out, metrics on HTTP.

    ``source`` and ``sink`` default to Kafka; tests may pass the fakes of
    :mod:`stream_forecaster.testing` instead, and a ``clock`` of their own.
    Partition ownership, refills, commits and eviction live in
    :class:`~stream_forecaster.recovery.Recovery`.
    """

    def __init__(self, config: Config, source=None, sink=None, registry=None, clock=time.monotonic):
        self.config = config
        self.stop = threading.Event()
        self.clock = clock
        self.store = ModelStore(config.model_store.path, config.model_store.keep)
        self.source, self.sink = source, sink
        self.metrics = None
        self._registry = registry if registry is not None else new_registry()
        self.pipeline: Pipeline | None = None
        self.recovery: Recovery | None = None
        self.checkpoints = None  # where refill checkpoints are kept (the state topic)
        self.batch_limit = min(500, config.kafka.max_poll_records)  # grows once batches are timed
        self.watcher: ModelWatcher | None = None
        self.server: MetricsServer | None = None
        # computed on the loop's thread (the Kafka consumer is not thread-safe), read by the endpoint's
        self._readiness = (False, 0.0)

    def request_stop(self, *_signal_args) -> None:
        self.stop.set()

    def ready(self) -> bool:
        """What the loop found last, while it is recent: a loop stuck longer than the group waits is not ready."""
        ready, at = self._readiness
        return ready and self.clock() - at < self.config.kafka.max_poll_interval_ms / 1000

    def _note_readiness(self, ready: bool) -> None:
        """Publish what the loop found, and when, for the endpoint's thread to read (:meth:`ready`)."""
        self._readiness = (ready, self.clock())

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            if self.initialize():
                self.loop()
        finally:
            self.shutdown()
        return 0

    def initialize(self) -> bool:
        """Load the model, start the endpoint and the Kafka clients; False if stopped first."""
        from .model import use_inference_threads  # noqa: PLC0415 (TensorFlow loads only once it is needed)

        use_inference_threads(self.config.model.inference_threads)
        if self.server is None:
            # at once: while it waits for a first model, /healthz says the process lives and /readyz says 503
            m = self.config.metrics
            self.server = MetricsServer(self._registry, m.host, m.port, self.ready).start()
        forecaster = self._wait_for_model()
        if forecaster is None:
            return False
        self.metrics = self.metrics or Metrics(forecaster.targets, self.config.metrics.labelled_sensors,
                                               self._registry)
        # read at each scrape, like /readyz: a loop stuck in a batch must not leave a stale 1 behind
        self.metrics.ready.set_function(lambda: 1 if self.ready() else 0)
        self._show_model(forecaster)
        if not self._connect():
            return False
        self.pipeline = Pipeline(self.config, forecaster, self.sink, self.metrics, self.stop)
        self.recovery = Recovery(self.config, self.source, self.pipeline, self.metrics, self.stop, self.checkpoints,
                                 self.clock)
        self.watcher = ModelWatcher(self.store, forecaster, self.config.model_store.poll_interval, self.stop,
                                    self.metrics, self.config.model.jit_compile).start()
        k = self.config.kafka
        log.info("stream-forecaster %s running: model version %s (%s -> %s), brokers %s, "
                 "topics %s -> %s, dead letters %s, metrics on http://%s:%d/metrics",
                 __version__, forecaster.version, ",".join(forecaster.features), ",".join(forecaster.targets),
                 ",".join(k.bootstrap_servers), k.input_topic, k.output_topic, k.dead_letter_topic or "off",
                 self.config.metrics.host, self.server.port)
        log.info("effective configuration: %s", json.dumps(self.config.redacted(), sort_keys=True))
        return True

    def _connect(self) -> bool:
        """Set up the Kafka clients, retrying with backoff while no broker answers; False if stopped."""
        if self.source is not None:  # a test's fakes
            self.checkpoints = getattr(self.source, "checkpoints", None)
            return True
        from .kafka_io import BrokerUnavailable, KafkaCheckpoints, KafkaSink, KafkaSource  # noqa: PLC0415

        backoff = 1.0
        while not self.stop.is_set():
            try:
                if self.sink is None:
                    self.sink = KafkaSink(self.config.kafka, on_retry=self.metrics.publish_retries.inc,
                                          on_recreate=self.metrics.producer_recreations.inc,
                                          on_refused=self.metrics.refused_records.inc)
                if self.checkpoints is None:
                    self.checkpoints = KafkaCheckpoints(self.config.kafka, self.sink)
                self.source = KafkaSource(self.config.kafka, on_unreadable=self.metrics.invalid.inc)
                return True
            except BrokerUnavailable as exc:
                log.warning("%s; retrying in %.0f s", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(30.0, backoff * 2)
        return False

    def _wait_for_model(self):
        from .model import Forecaster  # noqa: PLC0415 (TensorFlow loads only once a model is there)

        told = False
        while not self.stop.is_set():
            version = self.store.current()
            if version is not None:
                directory = self.store.verify(self.store.directory(version))
                forecaster = Forecaster.load(directory, version, self.config.model.jit_compile)
                forecaster.warm_up(CHUNK)
                return forecaster
            if not told:
                log.warning("no model in %s yet: waiting for one (train with `stream-forecaster train`)",
                            self.store.path)
                told = True
            self.stop.wait(self.config.model_store.poll_interval)
        return None

    def loop(self) -> None:
        next_gauges = next_eviction = 0.0
        recovery = self.recovery
        while not self.stop.is_set():
            self._swap_if_ready()
            try:
                records = self.source.poll(POLL_TIMEOUT_S, self.batch_limit)
            except Exception as exc:  # kafka-python raises on some broker faults; they pass, the loop must not
                log.warning("poll failed (%s: %s); retrying", type(exc).__name__, exc)
                self._note_readiness(False)
                self.stop.wait(1.0)
                continue
            self.metrics.last_poll.set_to_current_time()  # after it answered: a poll failing for ever is stuck too
            try:
                recovery.take_changes()
                self._note_readiness(recovery.ready())  # not ready from before a refill starts
                recovery.refill()
                self._note_readiness(recovery.ready())
            except Exception as exc:  # noqa: BLE001 (a broker call failed midway; what is left is tried again)
                log.warning("handling the new partitions failed (%s: %s); their readings are read again in 1 s",
                            type(exc).__name__, exc)
                self._note_readiness(False)
                self.source.rewind(records)
                self.stop.wait(1.0)
                continue
            if self.stop.is_set():
                # a refill cut short by the stop left windows without their latest readings
                break
            if records:
                started = time.monotonic()
                try:
                    offsets = self.pipeline.process(records)
                except Stopped:
                    log.warning("stopping before the last batch was acknowledged; it is not committed "
                                "and will be read again")
                    return
                recovery.processed(offsets)
                self._size_batches(len(records), time.monotonic() - started)
            now = self.clock()
            if now >= next_eviction:
                recovery.evict()
                next_eviction = now + max(1.0, self.config.window.idle_ttl / 10)
            recovery.commit()
            self._note_readiness(recovery.ready())
            if now >= next_gauges:
                self._update_gauges()
                next_gauges = now + GAUGE_INTERVAL_S

    def _size_batches(self, n: int, seconds: float) -> None:
        """Keep a batch's handling time within a quarter of ``max_poll_interval_ms``.

        A slow model or a slow broker then shrinks the batches instead of pushing
        the member out of its group (and every member into a rebalance storm).
        """
        k = self.config.kafka
        budget = k.max_poll_interval_ms / 1000 / 4
        if seconds > 0:
            fitting = int(n * budget / seconds)
            self.batch_limit = max(1, min(k.max_poll_records, fitting, 2 * max(n, self.batch_limit)))

    def _swap_if_ready(self) -> None:
        new = self.watcher.take()
        if new is None:
            return
        old = self.pipeline.forecaster.version
        self.pipeline.swap_model(new)
        self.metrics.swapped.inc()
        self._show_model(new)
        log.info("now serving model version %s (was %s)", new.version, old)

    def _show_model(self, forecaster) -> None:
        self.metrics.model_version.set(_version_number(forecaster.version))
        try:
            created = dt.datetime.fromisoformat(forecaster.metadata["created"]).timestamp()
        except (KeyError, TypeError, ValueError):
            created = 0.0  # unknown: an alert on model age fires, which is what an unknown age deserves
        self.metrics.model_created.set(created)

    def _update_gauges(self) -> None:
        try:
            lag = self.source.lag()
        except Exception as exc:  # noqa: BLE001 (a gauge is not worth the daemon; the next tick tries again)
            log.warning("consumer lag unknown (%s: %s)", type(exc).__name__, exc)
            lag = None
        if lag is not None:
            self.metrics.consumer_lag.set(lag)

    def shutdown(self) -> None:
        if self.source is not None:
            if self.recovery is not None:
                self.recovery.commit()  # a commit refused earlier: what was published must not be repeated
            self.source.close()
        if self.sink is not None:
            self.sink.close()
        if self.server is not None:
            self.server.stop()
        log.info("stopped")


def _version_number(version: str | None) -> float:
    return float(version) if version and version.isascii() and version.isdigit() else 0.0
