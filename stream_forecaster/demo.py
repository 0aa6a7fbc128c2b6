"""``stream-forecaster demo``: everything at once on one machine, with a live view.

Starts the embedded broker on a free port, trains a model on the first three
weeks of the bundled sample if the store is empty, starts the daemon as a child
process, replays the held-back last week at an accelerated rate, prints a live
line, and at the end writes a PNG of the streamed predictions against the truth.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .config import Config, load_config
from .devbroker import DevBroker, free_port
from .errors import Interrupted, UserError
from .files import SAMPLE_PATH, read_uci
from .metrics import scrape
from .replay import replay_file
from .store import open_store
from .topics import ensure_topics, read_topic

__all__ = ["run_demo"]

log = logging.getLogger(__name__)
SENSOR = "house-1"
TRAIN_FRACTION = 0.75  # three of the sample's four weeks; the fourth is replayed
DEMO_EPOCHS = 3
PLOT_POINTS = 300


def run_demo(config_path: str | None, overrides: list[str], *, duration: float | None, rate: float,
             out_dir: Path) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    with DevBroker(log_path=out_dir / "broker.log") as broker:
        demo_overrides = [*overrides, f"kafka.bootstrap_servers={broker.address}", "kafka.session_timeout_ms=6000",
                          f"metrics.port={metrics_port}"]
        config = load_config(config_path, demo_overrides)
        print(f"broker: {broker.address} (embedded, in memory)")
        _train_if_empty(config, stop)
        ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=3)
        daemon = _start_daemon(config_path, demo_overrides, out_dir / "daemon.log")
        try:
            return _run(config, daemon, f"http://{config.metrics.host}:{metrics_port}", stop, duration, rate, out_dir)
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
            print(f"daemon stopped (exit {daemon.returncode}); log: {out_dir / 'daemon.log'}")


def _train_if_empty(config: Config, stop: threading.Event) -> None:
    store = open_store(config)
    if store.current() is not None:
        print(f"model: version {store.current()} from {store.path}")
        return
    from .training import train

    epochs = min(config.model.epochs, DEMO_EPOCHS)  # a demo should start within a minute or two
    print(f"model: none in {store.path}; training one on the first three weeks of the bundled sample ({epochs} epochs)")
    columns = list(dict.fromkeys(config.data.features + config.data.targets))
    series = read_uci(SAMPLE_PATH, columns, ratio=TRAIN_FRACTION)
    trained = train(config.replace("model", epochs=epochs), series, stop=stop)
    if stop.is_set():
        raise Interrupted("stopped while training the demo's model; nothing was written")
    version = store.publish(trained.forecaster.save)
    s = trained.test.summary()
    print(f"model: version {version} trained in {trained.seconds:.0f} s; test RMSE {s['rmse']:.4f} "
          f"(persistence {s['persistence_rmse']:.4f})")


def _start_daemon(config_path, overrides, log_path: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "stream_forecaster.cli", "run"]
    if config_path:
        args += ["--config", config_path]
    for o in overrides:
        args += ["--set", o]
    return subprocess.Popen(args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _run(config: Config, daemon, url: str, stop, duration, rate, out_dir: Path) -> int:
    started = time.monotonic()
    while not _ready(url):
        if daemon.poll() is not None:
            raise UserError(f"the daemon exited with code {daemon.returncode}; see {out_dir / 'daemon.log'}")
        if stop.wait(0.2):
            return 130
    print(f"daemon: ready in {time.monotonic() - started:.0f} s, metrics on {url}/metrics")

    sample = read_uci(SAMPLE_PATH, config.data.targets)
    head = read_uci(SAMPLE_PATH, config.data.targets, ratio=TRAIN_FRACTION)  # what the model trained on
    expected = max(0, len(sample) - len(head) - (config.model.sequence_length - 2))
    predictions: dict[int, float] = {}
    replay_done, collected, finished = threading.Event(), threading.Event(), threading.Event()

    def replay():
        try:
            replay_file(config.kafka, SAMPLE_PATH, SENSOR, rate=rate, skip=head.lines, stop=stop, progress=False)
        finally:
            replay_done.set()

    def collect():
        for record in read_topic(config.kafka, config.kafka.output_topic, finished):
            p = json.loads(record.value)
            if p["timestamp"]:
                value = p["prediction"] if isinstance(p["prediction"], float) else next(iter(p["prediction"].values()))
                predictions[int(np.datetime64(p["timestamp"].rstrip("Z"), "s").astype(np.int64))] = value
            if len(predictions) >= expected:
                collected.set()

    threading.Thread(target=replay, daemon=True).start()
    threading.Thread(target=collect, daemon=True).start()
    print(f"replaying the held-back week ({sample.lines - head.lines:,} readings of {SENSOR}) at {rate:.0f}/s; "
          "Ctrl-C stops")
    target = config.data.targets[0]
    keys = {
        "readings": 'stream_forecaster_readings_total{outcome="accepted"}',
        "predictions": "stream_forecaster_predictions_total",
        "model": f'stream_forecaster_rolling_mae{{forecaster="model",target="{target}"}}',
        "persistence": f'stream_forecaster_rolling_mae{{forecaster="persistence",target="{target}"}}',
    }
    last, last_t = scrape(url + "/metrics"), time.monotonic()
    while not stop.wait(1.0):
        now, m = time.monotonic(), scrape(url + "/metrics")
        per_s = {k: (m[keys[k]] - last[keys[k]]) / (now - last_t) for k in ("readings", "predictions")}
        print(f"\rreadings {m[keys['readings']]:>7,.0f} ({per_s['readings']:5.0f}/s)  "
              f"predictions {m[keys['predictions']]:>7,.0f} ({per_s['predictions']:5.0f}/s)  "
              f"rolling MAE: model {m[keys['model']]:.4f}, persistence {m[keys['persistence']]:.4f}",
              end="", flush=True)
        last, last_t = m, now
        if daemon.poll() is not None:
            print()
            raise UserError(f"the daemon exited with code {daemon.returncode}; see {out_dir / 'daemon.log'}")
        if duration is not None and now - started >= duration:
            break
        if replay_done.is_set() and m[keys["predictions"]] >= expected:
            collected.wait(30)  # the plot's reader may trail the daemon's own count by a moment
            break
    print()
    stop.set()
    finished.set()
    path = _plot(sample, predictions, target, out_dir / "demo.png")
    if path:
        print(f"plot: {path} ({len(predictions):,} predictions)")
    return 0


def _plot(sample, predictions: dict[int, float], target: str, path: Path) -> Path | None:
    if not predictions:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install 'stream-forecaster[plot]'")
        return None
    stamps = np.array(sorted(predictions))[:PLOT_POINTS]
    index = np.searchsorted(sample.timestamps, stamps)
    keep = (index < len(sample)) & (sample.timestamps[np.minimum(index, len(sample) - 1)] == stamps)
    stamps, index = stamps[keep], index[keep]
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.plot(sample.values[index, 0], label="true data")
    ax.plot([predictions[s] for s in stamps], label="streamed prediction")
    ax.plot(sample.values[index - 1, 0], label="persistence", alpha=0.5, linestyle=":")
    ax.set_ylabel(target)
    ax.set_xlabel(f"minute (first {len(stamps)} streamed predictions)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
