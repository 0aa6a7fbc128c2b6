"""Benchmark: readings/s in and predictions/s out through the embedded broker, beside the model-only ceiling.

    python benchmarks/throughput.py [--readings 40000] [--sensors 1 1000] [--per-sensor 100]

Every sensor reports minute by minute (the sample's readings, cycled, at
consecutive minutes). A first daemon consumes the readings that fill the windows
(no forecast yet) and stops; then a backlog is produced, and a second daemon,
which refills the windows from the topic as it starts, works through it: every
reading forecast. It starts with small poll batches and doubles them while it
times them; it is timed in the steady state, once its batches are full size
(after its first batch of more than 10,000 readings), over at least 100
readings per sensor (50 under `run.py --quick`) and at least ``--readings``.

The default model (config defaults, untrained weights: speed does not depend on
them) is published to a temporary store. The daemon is a real
`stream-forecaster run` process. The timed stretch runs from the last forecast
of the batch before it to the last forecast of all, by the forecasts' own
timestamps in the output topic; the CPU is read from /proc at the scrapes of
the daemon's /metrics that bound it. The ceiling is the compiled, batched model
call alone, in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stream_forecaster.config import load_config  # noqa: E402
from stream_forecaster.devbroker import DevBroker, free_port  # noqa: E402
from stream_forecaster.files import SAMPLE_PATH, open_text  # noqa: E402
from stream_forecaster.inference import usable_cores  # noqa: E402
from stream_forecaster.kafka_io import KafkaSink  # noqa: E402
from stream_forecaster.messages import OutRecord  # noqa: E402
from stream_forecaster.metrics import scrape  # noqa: E402
from stream_forecaster.model import Forecaster, build_model, use_tensorflow_threads  # noqa: E402
from stream_forecaster.store import ModelMetadata, ModelStore  # noqa: E402
from stream_forecaster.topics import ensure_topics, read_topic  # noqa: E402


def default_forecaster(config) -> Forecaster:
    meta = {"features": list(config.data.features), "targets": list(config.data.targets),
            "sequence_length": config.model.sequence_length, "predict": config.model.predict,
            "min_step": [0.2] * len(config.data.targets),  # as trained (chosen on validation): the same work
            "normalization": {"method": "window"}, "scaled_units": True,
            "intervals": {"quantiles": [0.1, 0.9], "lower": [-1.0] * len(config.data.targets),
                          "upper": [1.0] * len(config.data.targets), "adaptation": 0.005}}
    return Forecaster(build_model(config.model, config.layers()), ModelMetadata.from_dict(meta))


def ceiling(forecaster: Forecaster, seconds: float = 3.0, callers: int = 1) -> dict[int, float]:
    """Windows/s at several batch sizes, with ``callers`` threads calling the model at once."""
    rates = {}
    rng = np.random.default_rng(0)
    for batch in (64, 256, 1024, 4096):
        windows = rng.normal(size=(batch, forecaster.sequence_length - 1, len(forecaster.features))).astype(np.float32)
        forecaster.forecast(windows)
        counts, start = [0] * callers, time.perf_counter()

        def call(i):  # run by threads joined within this iteration: no late binding
            while time.perf_counter() - start < seconds:  # noqa: B023
                forecaster.forecast(windows)  # noqa: B023
                counts[i] += batch  # noqa: B023

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[batch] = sum(counts) / (time.perf_counter() - start)
    return rates


def ceilings(forecaster: Forecaster, seconds: float = 3.0) -> dict[str, dict[int, float]]:
    """The model alone, both ways: one call on TensorFlow's own threads (in this process), and as the daemon
    runs it, one call per CPU at once, one core each (a fresh process: TensorFlow fixes its pools at start)."""
    daemon = subprocess.run([sys.executable, __file__, "--ceiling-as-daemon", str(seconds)],
                            capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    return {"one call": ceiling(forecaster, seconds),
            f"{_cpus()} calls at once": {int(k): v for k, v in json.loads(daemon).items()}}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of a process's main thread and of its other threads (Linux /proc; {} elsewhere)."""
    tick, spent = os.sysconf("SC_CLK_TCK"), {"main": 0.0, "other": 0.0}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that ended meanwhile
        spent["main" if tid == str(pid) else "other"] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return spent


RAMP_READINGS = 40_000  # before the daemon's batches pass 10,000 readings: they start at 500 and double
FULL_BATCH = 'stream_forecaster_batch_readings_bucket{le="10000.0"}'


def end_to_end(broker, store_path: Path, readings: int, sensors: int, workdir: Path, per_sensor: int = 100,
               client: str = "kafka-python") -> dict:
    """Steady state: a first daemon fills every window and stops; a second one, which refills the windows
    from the topic on start, is timed over a backlog in which every reading is forecast, once its batches
    are full size."""
    readings = max(readings, per_sensor * sensors)
    tag = f"s{sensors}-{time.monotonic_ns()}"
    overrides = [f"kafka.bootstrap_servers={broker.address}", f"kafka.input_topic=in-{tag}",
                 f"kafka.output_topic=out-{tag}", f"kafka.group_id=g-{tag}", "kafka.session_timeout_ms=6000",
                 f"model_store.path={store_path}", f"metrics.port={free_port()}", f"kafka.client={client}"]
    config = load_config(None, overrides, environ={})
    ensure_topics(config.kafka, [config.kafka.input_topic, config.kafka.output_topic], partitions=3)
    with open_text(SAMPLE_PATH) as f:
        next(f)
        values = [line.rstrip("\n").split(";", 2)[2].encode() for line in f if "?" not in line]
    keys = [f"sensor-{i}".encode() for i in range(sensors)]
    starts = [s % len(values) for s in range(sensors)]  # each sensor its own stretch of the sample
    first_minute = datetime.datetime(2007, 1, 1)

    def produce(minutes: range) -> int:
        sink = KafkaSink(config.kafka, client_id="benchmark")
        for minute in minutes:  # as a fleet reports: every sensor, minute by minute
            stamp = (first_minute + datetime.timedelta(minutes=minute)).strftime("%d/%m/%Y;%H:%M:%S;").encode()
            for key, start in zip(keys, starts):
                sink.send(OutRecord(config.kafka.input_topic, key, stamp + values[(start + minute) % len(values)]))
        sink.flush()
        sink.close()
        return len(minutes) * sensors

    args = [sys.executable, "-m", "stream_forecaster.cli", "run"]
    for o in overrides:
        args += ["--set", o]
    url = f"http://127.0.0.1:{config.metrics.port}/metrics"

    def serve(until_predictions: int, until_readings: int, name: str):
        """Run a daemon until both counts are reached; the samples of (time, readings, predictions, daemon CPU,
        broker CPU) after its first full-size batch and at the end."""
        log = open(workdir / f"daemon-{client}-{sensors}-{name}.log", "wb")
        daemon = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first = None
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and daemon.poll() is None:
                try:
                    m = scrape(url)
                except OSError:
                    time.sleep(0.05)
                    continue
                # .get: the endpoint answers before the model is loaded, without these metrics yet
                sample = (time.monotonic(), m.get('stream_forecaster_readings_total{outcome="accepted"}', 0),
                          m.get("stream_forecaster_predictions_total", 0), _cpu_seconds(daemon.pid),
                          _cpu_seconds(broker.process.pid))
                full_batches = m.get("stream_forecaster_batch_readings_count", 0) - m.get(FULL_BATCH, 0)
                if first is None and full_batches > 0:
                    first = sample
                if sample[1] >= until_readings and sample[2] >= until_predictions:
                    return first, sample
                # polling: often until the steady state starts (its CPU is read then), then less (a scrape costs
                # the daemon CPU)
                time.sleep(0.02 if first is None else 0.2)
        finally:
            daemon.terminate()
            daemon.wait(60)
        raise SystemExit(f"the daemon did not finish; see {workdir}")

    filling = config.model.sequence_length - 2  # a sensor's first forecast comes with its next reading
    serve(0, produce(range(filling)), "filling")
    expected = produce(range(filling, filling + -(-(RAMP_READINGS + readings) // sensors)))
    first, last = serve(expected, expected, "timed")
    if first is None or last[2] - first[2] < readings:
        raise SystemExit(f"the daemon's batches never grew past 10,000 readings; see {workdir}")
    stamps = np.sort([r.timestamp for r in read_topic(config.kafka, config.kafka.output_topic, threading.Event(),
                                                      idle_s=5)])
    if len(stamps) != last[2]:
        raise SystemExit(f"{len(stamps)} forecasts in the output topic, the daemon counted {last[2]:.0f}")
    # first[2] forecasts came before the steady state: from the last of those to the last of all
    seconds, predictions = (stamps[-1] - stamps[int(first[2]) - 1]) / 1000, last[2] - first[2]
    cpu = {}  # where the CPU went per prediction (the broker's share included: it shares the cores here)
    if first[3] and last[3] and first[4] and last[4]:
        cpu = {"daemon main thread": last[3]["main"] - first[3]["main"],
               "daemon other threads": last[3]["other"] - first[3]["other"],
               "broker": sum(last[4].values()) - sum(first[4].values())}
        cpu = {name: 1e6 * s / predictions for name, s in cpu.items()}
    return {"client": client, "sensors": sensors, "readings": last[1], "predictions": last[2], "seconds": seconds,
            "readings_per_s": (last[1] - first[1]) / (last[0] - first[0]), "predictions_per_s": predictions / seconds,
            "cpu_us_per_prediction": cpu}


def cpu_breakdown(cpu: dict[str, float], ceiling_rate: float) -> str:
    """CPU per prediction, by where it went, and the throughput those costs allow on this machine's cores."""
    if not cpu:
        return "CPU per prediction: not measured (needs Linux /proc)"
    total, cores = sum(cpu.values()), _cpus()
    model = 1e6 * cores / ceiling_rate  # the ceiling's CPU per window, all cores busy
    return ("CPU per prediction: " + ", ".join(f"{name} {us:.0f} µs" for name, us in cpu.items())
            + f"; {total:.0f} µs in all, of which the model alone needs {model:.0f} µs at the ceiling; "
            f"{cores} cores busy all the time would serve {1e6 * cores / total:,.0f}/s, "
            f"{100 * model / total:.0f} % of the ceiling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=40_000)
    parser.add_argument("--sensors", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--per-sensor", type=int, default=100, help="timed readings per sensor, at least")
    parser.add_argument("--client", choices=("kafka-python", "confluent"), default="kafka-python",
                        help="the daemon's Kafka client (kafka.client)")
    parser.add_argument("--ceiling-as-daemon", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = load_config(None, environ={})
    if args.ceiling_as_daemon:
        use_tensorflow_threads(usable_cores())  # as the daemon sets TensorFlow up
        print(json.dumps(ceiling(default_forecaster(config), args.ceiling_as_daemon, _cpus())))
        return
    forecaster = default_forecaster(config)
    print("model-only ceiling (default model, compiled batched call):")
    rates = {}
    for arrangement, by_batch in ceilings(forecaster).items():
        for batch, rate in by_batch.items():
            print(f"  {arrangement:>16}, batch {batch:>5}: {rate:>8,.0f} windows/s")
        rates.update({(arrangement, batch): rate for batch, rate in by_batch.items()})
    with tempfile.TemporaryDirectory() as tmp, DevBroker() as broker:
        store = ModelStore(Path(tmp) / "models")
        store.publish(forecaster.save)
        print("end to end through the embedded broker (a backlog of readings, 3 partitions):")
        print(f"  {'sensors':>7} {'readings':>9} {'readings/s':>11} {'predictions/s':>14} {'% of best ceiling':>18}")
        for sensors in args.sensors:
            r = end_to_end(broker, store.path, args.readings, sensors, Path(tmp), args.per_sensor, args.client)
            print(f"  {sensors:>7} {r['readings']:>9,.0f} {r['readings_per_s']:>11,.0f} "
                  f"{r['predictions_per_s']:>14,.0f} "
                  f"{100 * r['predictions_per_s'] / max(rates.values()):>17.0f}%")
            print("          " + cpu_breakdown(r["cpu_us_per_prediction"], max(rates.values())))


if __name__ == "__main__":
    main()
