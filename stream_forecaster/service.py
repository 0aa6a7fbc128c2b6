"""The daemon: wiring, the poll loop, signals and shutdown.

Shaped like huey's consumer: ``initialize`` / ``loop`` / ``shutdown`` around one
stop event. Signal handlers only set that event; the loop checks it between
batches, so SIGTERM finishes the batch in hand, publishes and commits it, and
exits 0 within about one poll timeout plus one batch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from . import __version__
from .config import Config
from .metrics import Metrics, MetricsServer
from .pipeline import Pipeline, Stopped
from .registry import ModelStore

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 0.5
GAUGE_INTERVAL_S = 1.0


class Daemon:
    """``stream-forecaster run``: Kafka in, forecasts out, metrics on HTTP.

    ``source`` and ``sink`` default to Kafka; tests may pass the fakes of
    :mod:`stream_forecaster.testing` instead.
    """

    def __init__(self, config: Config, source=None, sink=None, registry=None):
        self.config = config
        self.stop = threading.Event()
        self.store = ModelStore(config.model_store.path, config.model_store.keep)
        self.source, self.sink = source, sink
        self.metrics = None
        self._registry = registry
        self.pipeline: Pipeline | None = None
        self.server: MetricsServer | None = None

    def request_stop(self, *_signal_args) -> None:
        self.stop.set()

    def ready(self) -> bool:
        return self.pipeline is not None and self.source is not None and self.source.assigned()

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
        forecaster = self._wait_for_model()
        if forecaster is None:
            return False
        self.metrics = self.metrics or Metrics(forecaster.targets, self.config.metrics.labelled_sensors,
                                               self._registry)
        self.metrics.model_version.set(float(forecaster.version) if forecaster.version.isdigit() else 0)
        if self.server is None:
            m = self.config.metrics
            self.server = MetricsServer(self.metrics, m.host, m.port, self.ready).start()
        from .kafka_io import KafkaSink, KafkaSource  # noqa: PLC0415 (keeps kafka out of fake-driven runs)

        if self.sink is None:
            self.sink = KafkaSink(self.config.kafka, on_retry=self.metrics.publish_retries.inc)
        if self.source is None:
            self.source = KafkaSource(self.config.kafka)
        self.pipeline = Pipeline(self.config, forecaster, self.sink, self.metrics, self.stop)
        k = self.config.kafka
        log.info("stream-forecaster %s running: model version %s (%s -> %s), brokers %s, "
                 "topics %s -> %s, dead letters %s, metrics on http://%s:%d/metrics",
                 __version__, forecaster.version, ",".join(forecaster.features), ",".join(forecaster.targets),
                 ",".join(k.bootstrap_servers), k.input_topic, k.output_topic, k.dead_letter_topic or "off",
                 self.config.metrics.host, self.server.port)
        return True

    def _wait_for_model(self):
        from .model import Forecaster  # noqa: PLC0415 (TensorFlow loads only once a model is there)

        told = False
        while not self.stop.is_set():
            version = self.store.current()
            if version is not None:
                directory = self.store.verify(self.store.directory(version))
                forecaster = Forecaster.load(directory, version)
                forecaster.warm_up()
                return forecaster
            if not told:
                log.warning("no model in %s yet: waiting for one (train with `stream-forecaster train`)",
                            self.store.path)
                told = True
            self.stop.wait(self.config.model_store.poll_interval)
        return None

    def loop(self) -> None:
        next_gauges = 0.0
        while not self.stop.is_set():
            records = self.source.poll(POLL_TIMEOUT_S)
            if records:
                try:
                    offsets = self.pipeline.process(records)
                except Stopped:
                    log.warning("stopping before the last batch was acknowledged; it is not committed "
                                "and will be read again")
                    return
                self.source.commit(offsets)
            now = time.monotonic()
            if now >= next_gauges:
                self._update_gauges()
                next_gauges = now + GAUGE_INTERVAL_S

    def _update_gauges(self) -> None:
        lag = self.source.lag()
        if lag is not None:
            self.metrics.consumer_lag.set(lag)
        self.metrics.ready.set(1 if self.ready() else 0)

    def shutdown(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.sink is not None:
            self.sink.close()
        if self.server is not None:
            self.server.stop()
        log.info("stopped")
