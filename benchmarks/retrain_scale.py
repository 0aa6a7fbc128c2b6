"""Benchmark: retraining cycles at fleet size: read the history, sample, train, gate; time and peak memory.

    python benchmarks/retrain_scale.py [--sensors 1000 10000] [--interval 10m] [--days 14] [--cycles 2]
                                       [--set SECTION.KEY=VALUE ...] [--json FILE]

Each fleet size runs in a fresh interpreter, so its peak resident memory is its
own. Synthetic JSON readings (``load_kw`` and ``volts``; each sensor its own
size, phase and noise, a daily cycle) are made as they are read, one every
``--interval`` per sensor over ``--days``, in the order a topic delivers them
(time after time, the sensors interleaved), and go through the daemon's parser
by ``series_from_records``, as the retrainer reads its topic, without a broker.
Then ``--cycles`` retraining cycles (``Retrainer.run_once``) on that history,
into a temporary store: sample (``model.max_windows``), train, backtest, gate,
publish. The first cycle trains from scratch with no current model; the next
ones start from the current model and the gate backtests it too, as the
retrainer's steady state does. A later cycle reuses the history read once.

The model is the default one on the two columns, for ``model.epochs=1``
unless ``--set`` says otherwise. Reported: readings; reading time (making the
synthetic records included) and microseconds a reading; resident memory after
the imports, its peak while reading (and the growth per reading) and after it;
the windows sampled (training + validation, test) of how many; per cycle, the
seconds in ``train`` (sampling included) and in the rest (backtesting the
current model, gate, publish); the peak resident memory of the whole run.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ("load_kw", "volts")
SETTINGS = ["data.features=[load_kw, volts]", "data.targets=[load_kw]", "model.epochs=1"]
START = 1_709_251_200  # 2024-03-01T00:00:00Z

Record = collections.namedtuple("Record", "key value timestamp")  # what series_from_records reads of a record


def records(sensors: int, interval_s: float, days: float, seed: int = 0):
    """The synthetic readings, time after time, each time's readings of every sensor in turn."""
    import datetime as dt

    import numpy as np

    rng = np.random.default_rng(seed)
    size = rng.lognormal(0.0, 1.5, sensors)  # sites from a fraction of a kW to tens
    phase = rng.uniform(0, 2 * np.pi, sensors)
    noise = rng.uniform(0.05, 0.3, sensors)
    level = 230 + rng.normal(0, 3, sensors)
    keys = [b"sensor-%06d" % i for i in range(sensors)]
    for step in range(int(days * 86400 // interval_s)):
        t = START + step * interval_s
        stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
        load = size * np.maximum(0.0, 1 + 0.5 * np.sin(2 * np.pi * t / 86400 + phase)
                                 + noise * rng.standard_normal(sensors))
        volts = level + rng.normal(0, 1, sensors)
        ms = int(t * 1000)
        for key, kw, v in zip(keys, load.tolist(), volts.tolist()):
            yield Record(key, b'{"timestamp":"%s","values":{"load_kw":%.3f,"volts":%.1f}}' % (stamp, kw, v), ms)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(sensors: int, interval_s: float, days: float, cycles: int, overrides: list[str]) -> dict:
    """One fleet size, measured in this (fresh) interpreter."""
    import stream_forecaster.training as training  # TensorFlow: loaded before the baseline
    from stream_forecaster.config import load_config
    from stream_forecaster.retrain import Retrainer, series_from_records

    spent = collections.defaultdict(float)
    chosen = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
        return wrapper

    def sampled(*args):
        result = choose(*args)
        chosen.update(train=len(result.train) + len(result.validation), test=len(result.test),
                      available=sum(result.available.values()))
        return result

    choose = training.choose_windows
    training.choose_windows = timed("sample", sampled)
    training.train = timed("train", training.train)  # the retrainer imports it from the module on each cycle

    with tempfile.TemporaryDirectory() as store:
        config = load_config(None, [*SETTINGS, f"model_store.path={store}", *overrides], environ={})
        baseline = _status("VmRSS")
        started = time.perf_counter()
        series = series_from_records(records(sensors, interval_s, days), COLUMNS, config.kafka.max_message_bytes,
                                     config.retrain.history, "synthetic")
        read_s = time.perf_counter() - started
        read_peak, after_read = _status("VmHWM"), _status("VmRSS")

        class Synthetic(Retrainer):
            def load_series(self):
                return series

        retrainer = Synthetic(config)
        runs = []
        for _ in range(cycles):
            spent.clear()
            started = time.perf_counter()
            outcome = retrainer.run_once()
            total = time.perf_counter() - started
            runs.append({"outcome": outcome.outcome, "reason": outcome.reason, "seconds": total,
                         "sample_s": spent["sample"], "train_s": spent["train"], "rest_s": total - spent["train"],
                         "windows": dict(chosen)})
    return {"sensors": sensors, "readings": len(series), "read_s": read_s, "baseline_bytes": baseline,
            "read_peak_bytes": read_peak, "after_read_bytes": after_read,
            "series_bytes": series.values.nbytes + series.timestamps.nbytes, "cycles": runs,
            "peak_bytes": _status("VmHWM"), "max_windows": config.model.max_windows}


def measure(sensors: int, interval_s: float, days: float, cycles: int, overrides: list[str]) -> dict:
    spec = json.dumps([sensors, interval_s, days, cycles, overrides])
    done = subprocess.run([sys.executable, __file__, "--child", spec], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def report(r: dict) -> None:
    n = r["readings"]
    growth = (r["read_peak_bytes"] - r["baseline_bytes"]) / n
    print(f"{r['sensors']:>8,} sensors, {n:,} readings: read {r['read_s']:.1f} s ({r['read_s'] / n * 1e6:.1f} µs a "
          f"reading); memory {r['baseline_bytes'] / 1e6:.0f} MB after the imports, {r['read_peak_bytes'] / 1e6:.0f} MB "
          f"peak while reading ({growth:.0f} bytes a reading), {r['after_read_bytes'] / 1e6:.0f} MB after it "
          f"(the series holds {r['series_bytes'] / n:.0f} bytes a reading)")
    for i, c in enumerate(r["cycles"], 1):
        w = c["windows"]
        print(f"{'':>10}cycle {i}: {c['outcome']:<9} {w['train']:>9,} + {w['test']:>7,} windows of "
              f"{w['available']:>11,}"
              f"  sample {c['sample_s']:6.1f} s  train {c['train_s']:7.1f} s  gate and publish {c['rest_s']:6.1f} s"
              f"  cycle {c['seconds']:7.1f} s")
    last = r["cycles"][-1]["seconds"] if r["cycles"] else 0.0
    print(f"{'':>10}read + last cycle {r['read_s'] + last:.1f} s; peak memory {r['peak_bytes'] / 1e6:.0f} MB")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(*json.loads(sys.argv[2]))))
        return
    from stream_forecaster.config import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--interval", default="10m", help="time between a sensor's readings (30s, 10m, 1h)")
    parser.add_argument("--days", type=float, default=14.0, help="days of readings (retrain.history is 14d)")
    parser.add_argument("--cycles", type=int, default=2, help="cycles on the history read (0: reading only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()
    interval = parse_duration(args.interval)
    readings = [n * math.floor(args.days * 86400 / interval) for n in args.sensors]
    print(f"one reading every {interval:g} s for {args.days:g} days: {', '.join(f'{r:,}' for r in readings)} "
          f"readings; settings {' '.join(SETTINGS + args.overrides)}")
    results = []
    for n in args.sensors:
        results.append(measure(n, interval, args.days, args.cycles, args.overrides))
        report(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
