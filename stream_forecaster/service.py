"""The daemon: wiring, the poll loop, signals and shutdown.

Shaped like huey's consumer: ``initialize`` / ``loop`` / ``shutdown`` around one
stop event. Signal handlers only set that event; the loop checks it between
batches, so SIGTERM finishes the batches in hand (one, or two where a batch
begins before the one before it is committed), publishes and commits them, and
exits 0 within about one poll timeout plus two batches.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import signal
import threading
import time

from . import __version__
from .clients import kafka_client
from .config import Config
from .errors import BrokerUnavailable
from .inference import InferenceRunner
from .metrics import CollectorRegistry, Metrics, MetricsServer, new_registry
from .pipeline import CHUNK, Batch, Pipeline, Stopped
from .recovery import Recovery
from .seams import Checkpoints, Clock, Forecaster, Sink, Source, Wait
from .state_topic import StateTopic, ensure_compacted
from .store import ModelStore, ModelStoreError, open_store

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

    def __init__(self, store: ModelStore, serving: Forecaster, poll_interval: float, stop: threading.Event,
                 metrics: Metrics, jit_compile: bool = True):
        self.store, self.poll_interval, self.stop, self.metrics = store, poll_interval, stop, metrics
        self.jit_compile = jit_compile
        self.serving = serving
        self._seen = serving.version
        self._ready: Forecaster | None = None
        self._shadow_seen: str | None = None  # the SHADOW version last acted on
        self._candidate: list[Forecaster | None] = []  # a change of candidate to hand over (None: no more)
        self.decided: set[str] = set()  # candidates this daemon promoted or dropped: never shadowed again
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> "ModelWatcher":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.poll_interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 (the thread must outlive any surprise, or hot swaps end for good)
                log.exception("checking the model store failed; trying again in %.0f s", self.poll_interval)

    def check(self) -> None:
        """Load the current version if it is new, and the shadow version if it changed; refuse either (logged,
        counted) if it does not fit."""
        try:
            version, shadow = self.store.current(), self.store.shadow()
        except (OSError, ModelStoreError) as exc:  # checked again next poll: fixing the pointer is enough
            log.warning("cannot read the model store pointer: %s", exc)
            return
        if version is not None and version != self._seen:
            self._seen = version
            loaded = self._load(version, "model version")
            if loaded is not None:
                with self._lock:
                    self._ready = loaded
        if shadow != self._shadow_seen:
            self._shadow_seen = shadow
            wanted = shadow is not None and shadow not in self.decided and shadow != self._seen
            candidate = self._load(shadow, "shadow candidate") if wanted and shadow is not None else None
            with self._lock:
                self._candidate.append(candidate)

    def _load(self, version: str, what: str) -> Forecaster | None:
        served = (self.serving.features, self.serving.targets, self.serving.sequence_length)
        try:
            loaded = self.store.load(version, expect=served, jit_compile=self.jit_compile)
            loaded.warm_up(CHUNK)
            return loaded
        except Exception as exc:  # a bad version must never take the daemon down
            self.metrics.swap_refused.inc()
            log.error("refusing %s %s: %s; still serving version %s", what, version, exc, self.serving.version)
            return None

    def take_candidate(self) -> tuple[bool, Forecaster | None]:
        """``(changed, candidate)``: whether the shadow candidate changed since the last call, and to what."""
        with self._lock:
            changes, self._candidate = self._candidate, []
        return (True, changes[-1]) if changes else (False, None)

    def has_news(self) -> bool:
        """A new model or a change of shadow candidate waits to be taken."""
        with self._lock:
            return self._ready is not None or bool(self._candidate)

    def take(self) -> Forecaster | None:
        """The loaded new forecaster, once, or None."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self.serving = ready
        return ready


def _freeze_heap() -> None:
    """Leave every object made so far (TensorFlow's and the model's, by far the most) out of the cyclic
    garbage collector's passes: a full pass over them all stalls the loop, and allocating a poll batch's
    messages sets one off every few batches."""
    gc.collect()
    gc.freeze()


def _refreeze_heap() -> None:
    """After a model came or went, if the heap is frozen: the one that went can be collected, the one that
    came is frozen with the rest."""
    if gc.get_freeze_count():
        gc.unfreeze()
        _freeze_heap()


class Daemon:
    """``stream-forecaster run``: Kafka in, forecasts out, metrics on HTTP.

    ``source``, ``sink`` and ``checkpoints`` default to Kafka, ``forecaster``
    to the model store's current version (hot-swapped as the store moves on);
    tests may pass the fakes of :mod:`stream_forecaster.testing` instead (a
    forecaster given is served as it is: no TensorFlow). ``registry`` is the
    Prometheus registry the metrics go to. ``stop`` ends the daemon when set;
    ``clock`` times readiness, eviction and snapshots; ``wait(seconds)`` is how
    it pauses before a retry (True: stop was set meanwhile), ``retry_s`` how
    long. Partition ownership, refills, commits and eviction live in
    :class:`~stream_forecaster.recovery.Recovery`.
    """

    def __init__(self, config: Config, source: Source | None = None, sink: Sink | None = None,
                 registry: CollectorRegistry | None = None, clock: Clock = time.monotonic,
                 stop: threading.Event | None = None, wait: Wait | None = None, retry_s: float = 1.0,
                 checkpoints: Checkpoints | None = None, forecaster: Forecaster | None = None):
        self.config = config
        self.stop = stop or threading.Event()
        self.clock = clock
        self.wait: Wait = wait or self.stop.wait
        self.retry_s = retry_s
        self.store = open_store(config)
        self.source, self.sink = source, sink
        self.checkpoints = checkpoints  # where refill checkpoints are kept (the state topic)
        self.forecaster = forecaster
        self.metrics: Metrics | None = None
        self._registry = registry if registry is not None else new_registry()
        self.runner: InferenceRunner | None = None
        self.pipeline: Pipeline | None = None
        self.recovery: Recovery | None = None
        self.batch_limit = min(500, config.kafka.max_poll_records)  # grows once batches are timed
        self._in_hand: tuple[Batch, dict, float] | None = None  # begun, not finished: batch, checkpoints, start
        self._begun: Batch | None = None  # the last batch begun, whose readings are in the windows
        self._finished: tuple[Batch | None, dict] = (None, {})  # the last batch finished, and its checkpoints
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
        """Initialize, loop until stopped, shut down. In the main thread the daemon owns the process: it takes
        SIGTERM and SIGINT, and freezes the heap it started with (:func:`_freeze_heap`)."""
        owns_process = threading.current_thread() is threading.main_thread()
        if owns_process:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            if self.initialize():
                if owns_process:
                    _freeze_heap()
                self.loop()
        finally:
            self.shutdown()
        return 0

    def initialize(self) -> bool:
        """Load the model, start the endpoint and the Kafka clients; False if stopped first."""
        self.runner = self.runner or InferenceRunner(self.config.model.inference_threads)
        if self.forecaster is None:
            from .model import use_tensorflow_threads  # noqa: PLC0415 (TensorFlow loads only once it is needed)

            use_tensorflow_threads(self.runner.threads)
        if self.server is None:
            # at once: while it waits for a first model, /healthz says the process lives and /readyz says 503
            m = self.config.metrics
            self.server = MetricsServer(self._registry, m.host, m.port, self.ready).start()
        forecaster = self.forecaster or self._wait_for_model()
        if forecaster is None:
            return False
        metrics = self.metrics = self.metrics or Metrics(forecaster.targets, self.config.metrics.labelled_sensors,
                                                         self._registry)
        # read at each scrape, like /readyz: a loop stuck in a batch must not leave a stale 1 behind
        metrics.ready.set_function(lambda: 1 if self.ready() else 0)
        self._show_model(metrics, forecaster)
        clients = self._connect(metrics)
        if clients is None:
            return False
        self.source, self.sink, self.checkpoints = clients
        self.pipeline = Pipeline(self.config, forecaster, self.sink, metrics, self.stop, self.runner, self.clock)
        self.recovery = Recovery(self.config, self.source, self.pipeline, metrics, self.stop, self.checkpoints,
                                 self.clock)
        if self.forecaster is None:
            self.watcher = ModelWatcher(self.store, forecaster, self.config.model_store.poll_interval, self.stop,
                                        metrics, self.config.model.jit_compile).start()
        k = self.config.kafka
        log.info("stream-forecaster %s running: model version %s (%s -> %s), brokers %s, "
                 "topics %s -> %s, dead letters %s, metrics on http://%s:%d/metrics",
                 __version__, forecaster.version, ",".join(forecaster.features), ",".join(forecaster.targets),
                 ",".join(k.bootstrap_servers), k.input_topic, k.output_topic, k.dead_letter_topic or "off",
                 self.config.metrics.host, self.server.port)
        log.info("effective configuration: %s", json.dumps(self.config.redacted(), sort_keys=True))
        return True

    def _connect(self, metrics: Metrics) -> tuple[Source, Sink, Checkpoints | None] | None:
        """The source, sink and checkpoints: those given, else Kafka's, set up with backoff while no broker
        answers; None if stopped first."""
        if self.source is not None and self.sink is not None:  # a test's fakes
            return self.source, self.sink, self.checkpoints
        backoff = self.retry_s
        sink, checkpoints = self.sink, self.checkpoints
        sink_type, source_type, log_type = kafka_client(self.config.kafka)
        while not self.stop.is_set():
            try:
                if sink is None:  # kept as soon as made: shutdown closes it even if the rest never comes
                    sink = self.sink = sink_type(self.config.kafka, "stream-forecaster",
                                                 on_retry=metrics.publish_retries.inc,
                                                 on_recreate=metrics.producer_recreations.inc,
                                                 on_refused=metrics.refused_records.inc)
                if checkpoints is None and isinstance(sink, sink_type):
                    # the state topic is written by the sink's producer; with a sink of another kind refills
                    # replay window.rebuild_messages readings
                    state_log = log_type(self.config.kafka, sink)
                    checkpoints = StateTopic(self.config.kafka, state_log)
                    k = self.config.kafka
                    if k.health_topic:
                        ensure_compacted(state_log, k.health_topic, max(1, state_log.partitions(k.input_topic)),
                                         "health topic")
                source = self.source or source_type(self.config.kafka, on_unreadable=metrics.invalid.inc)
                return source, sink, checkpoints
            except BrokerUnavailable as exc:
                log.warning("%s; retrying in %.0f s", exc, backoff)
                self.wait(backoff)
                backoff = min(30.0 * self.retry_s, backoff * 2)
        return None

    def _wait_for_model(self) -> Forecaster | None:
        told = False
        while not self.stop.is_set():
            try:
                version = self.store.current()
                if version is not None:
                    forecaster = self.store.load(version, jit_compile=self.config.model.jit_compile)
                    forecaster.warm_up(CHUNK)
                    return forecaster
            except BrokerUnavailable as exc:  # a store in a Kafka topic, its broker away: tried again
                log.warning("%s; trying again in %.0f s", exc, self.config.model_store.poll_interval)
                self.wait(self.config.model_store.poll_interval)
                continue
            if not told:
                log.warning("no model in %s yet: waiting for one (train with `stream-forecaster train`)",
                            self.store.path)
                told = True
            self.wait(self.config.model_store.poll_interval)
        return None

    def loop(self) -> None:
        """Poll, begin the batch, finish the one before, commit it; until stopped.

        Where the source can finish work before a rebalance takes its
        partitions (``calls_before_revoke``) and readings wait, a batch begins
        before the one before it is finished, so the model computes while the
        loop publishes, commits and polls. A model comes or goes only between
        batches: the one in hand is finished first.
        """
        source, pipeline, recovery, metrics = self.source, self.pipeline, self.recovery, self.metrics
        if source is None or pipeline is None or recovery is None or metrics is None:
            raise RuntimeError("Daemon.loop() runs after initialize()")
        overlap = source.calls_before_revoke
        hook = (self._finish_in_hand,) if overlap else ()
        next_gauges = next_eviction = 0.0
        next_health = self.clock() + self.config.metrics.health_interval
        while not self.stop.is_set():
            if self._model_news(pipeline):
                if not self._finish_in_hand():
                    return
                self._decide_on_shadow(pipeline, metrics)
                self._swap_if_ready(pipeline, metrics)
                self._shadow_if_changed(pipeline, metrics)
            try:
                records = source.poll(0.0 if self._in_hand else POLL_TIMEOUT_S, self.batch_limit, *hook)
            except Exception as exc:  # kafka-python raises on some broker faults; they pass, the loop must not
                log.warning("poll failed (%s: %s); retrying", type(exc).__name__, exc)
                self._note_readiness(False)
                if not self._finish_in_hand():
                    return
                self.wait(self.retry_s)
                continue
            metrics.last_poll.set_to_current_time()  # after it answered: a poll failing for ever is stuck too
            # read now, before readings that arrive while this batch is handled count as a backlog
            backlog = overlap and bool(records) and self._readings_wait(source)
            try:
                recovery.take_changes()
                self._note_readiness(recovery.ready())  # not ready from before a refill starts
                if recovery.refilling() and not self._finish_in_hand():
                    return
                moved = recovery.refill()
                if moved:  # read from where the group committed: these come again
                    records = [r for r in records if r.partition not in moved]
                self._note_readiness(recovery.ready())
            except Exception as exc:  # noqa: BLE001 (a broker call failed midway; what is left is tried again)
                log.warning("handling the new partitions failed (%s: %s); their readings are read again in %.0f s",
                            type(exc).__name__, exc, self.retry_s)
                self._note_readiness(False)
                source.rewind(records)
                self.wait(self.retry_s)
                continue
            if self.stop.is_set():
                # a refill cut short by the stop left windows without their latest readings
                break
            began = None
            if records:
                held = self._in_hand[0].offsets if self._in_hand else {}
                started = time.monotonic()
                batch = self._begun = pipeline.begin(records)
                began = (batch, recovery.prepare({**held, **batch.offsets}), started)
            if not self._finish_in_hand():
                return
            self._in_hand = began
            # kept in hand only while readings wait, where the overlap pays: caught up, its forecasts would wait for
            # the next poll's readings
            if not backlog and not self._finish_in_hand():
                return
            now = self.clock()
            if now >= next_eviction:
                # evictions change the windows the next checkpoint describes: only with no batch in hand
                if not self._finish_in_hand():
                    return
                recovery.evict()
                next_eviction = now + max(1.0, self.config.window.idle_ttl / 10)
            if self._in_hand is None:
                recovery.commit()  # one refused earlier, or an eviction's
            self._note_readiness(recovery.ready())
            if now >= next_gauges:
                self._update_gauges(source, metrics)
                next_gauges = now + GAUGE_INTERVAL_S
            if now >= next_health:
                self._report_health(pipeline)
                next_health = now + self.config.metrics.health_interval
        self._finish_in_hand()

    def _model_news(self, pipeline: Pipeline) -> bool:
        """A new model to serve, a shadow candidate to start or stop, or the shadow's verdict is in."""
        shadow = pipeline.shadow
        return ((self.watcher is not None and self.watcher.has_news())
                or (shadow is not None and shadow.verdict() is not None))

    def _finish_in_hand(self) -> bool:
        """Finish the batch in hand, if any (publish, score), and commit it; False if the stop came before its
        forecasts were acknowledged (it is not committed, and is read again)."""
        held, self._in_hand = self._in_hand, None
        if held is None:
            return True
        assert self.pipeline is not None and self.recovery is not None
        batch, prepared, started = held
        try:
            offsets = self.pipeline.finish(batch)
        except Stopped:
            log.warning("stopping before the last batch was acknowledged; it is not committed and will be read again")
            return False
        self.recovery.processed(offsets)
        self.recovery.commit(prepared)
        self._finished = (batch, prepared)
        self._size_batches(len(batch.records), time.monotonic() - started)
        return True

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

    def _swap_if_ready(self, pipeline: Pipeline, metrics: Metrics) -> None:
        new = self.watcher.take() if self.watcher is not None else None
        if new is None:
            return
        old = pipeline.forecaster.version
        pipeline.swap_model(new)
        metrics.swapped.inc()
        self._show_model(metrics, new)
        log.info("now serving model version %s (was %s)", new.version, old)
        _refreeze_heap()

    def _shadow_if_changed(self, pipeline: Pipeline, metrics: Metrics) -> None:
        changed, candidate = self.watcher.take_candidate() if self.watcher is not None else (False, None)
        if not changed:
            return
        pipeline.set_candidate(candidate)
        metrics.shadow_version.set(_version_number(candidate.version if candidate else None))
        if candidate is not None:
            log.info("forecasting model version %s in shadow for %.0f%% of the sensors (serving %s)",
                     candidate.version, 100 * self.config.retrain.shadow_sample, pipeline.forecaster.version)
        else:
            log.info("no shadow candidate")
        _refreeze_heap()

    def _decide_on_shadow(self, pipeline: Pipeline, metrics: Metrics) -> None:
        """Promote the candidate that beat the serving model and persistence over ``retrain.shadow_for`` scored
        forecasts, drop one that did not; either way it leaves the shadow."""
        shadow = pipeline.shadow
        verdict = shadow.verdict() if shadow is not None else None
        if shadow is None or verdict is None:
            return
        version = shadow.candidate.version or ""
        candidate, serving, persistence = shadow.figures()
        pipeline.set_candidate(None)
        _refreeze_heap()
        metrics.shadow_version.set(0)
        metrics.shadow_decisions[verdict].inc()
        if self.watcher is not None:
            self.watcher.decided.add(version)
        log.info("shadow candidate %s %s after %d scored forecasts: %s %.6g against the serving model's %.6g and "
                 "persistence's %.6g", version, verdict, shadow.scored, shadow.metric, candidate, serving,
                 persistence)
        try:
            if self.store.shadow() != version:  # another daemon decided first, or an operator changed it
                return
            if verdict == "promoted":
                self.store.set_current(version)
            self.store.set_shadow(None)
        except (OSError, ModelStoreError) as exc:
            log.warning("cannot record the shadow decision in the model store (%s); the candidate stays there for "
                        "an operator (stream-forecaster models promote or shadow none)", exc)

    @staticmethod
    def _show_model(metrics: Metrics, forecaster: Forecaster) -> None:
        metrics.model_version.set(_version_number(forecaster.version))
        try:
            created = dt.datetime.fromisoformat(forecaster.metadata.created or "").timestamp()
        except (TypeError, ValueError):
            created = 0.0  # unknown: an alert on model age fires, which is what an unknown age deserves
        metrics.model_created.set(created)

    def _report_health(self, pipeline: Pipeline) -> None:
        """Each sensor's health to the health topic (waiting for the acknowledgements, as it waits for forecasts)
        and the fleet's gauges."""
        records = pipeline.health_report(time.time())
        if records and self.sink is not None and not self.sink.publish(records, self.stop):
            log.info("stopping before the sensors' health was acknowledged; the next daemon writes it again")

    @staticmethod
    def _readings_wait(source: Source) -> bool:
        """Whether readings wait behind the batch just polled (a backlog); no while the lag is unknown."""
        try:
            return bool(source.lag())
        except Exception:  # noqa: BLE001 (the batch is then finished at once; the lag gauge logs the trouble)
            return False

    @staticmethod
    def _update_gauges(source: Source, metrics: Metrics) -> None:
        try:
            lag = source.lag()
        except Exception as exc:  # noqa: BLE001 (a gauge is not worth the daemon; the next tick tries again)
            log.warning("consumer lag unknown (%s: %s)", type(exc).__name__, exc)
            lag = None
        if lag is not None:
            metrics.consumer_lag.set(lag)

    def shutdown(self) -> None:
        if self.source is not None:
            if self.recovery is not None:
                # a commit refused earlier: what was published must not be repeated. The windows may hold a
                # batch not finished: then the checkpoints taken when the last one finished was begun
                finished, prepared = self._finished
                self.recovery.commit(prepared if self._begun is not finished else None)
            self.source.close()
        if self.sink is not None:
            self.sink.close()
        if self.server is not None:
            self.server.stop()
        if self.runner is not None:
            self.runner.close()
        log.info("stopped")


def _version_number(version: str | None) -> float:
    return float(version) if version and version.isascii() and version.isdigit() else 0.0
