"""Benchmark: memory per active sensor in the daemon's window state (100,000 and 1,000,000 sensors).

    python benchmarks/memory.py [--sensors 100000 1000000]

Each count runs in a fresh interpreter: a pipeline for the default model
(windows of 49 readings of its 7 columns), and one for a one-column model,
receives one reading from each sensor,
through the real parser and ring buffers, in batches of 10,000. Reported: the
growth of resident memory from the end of the first batch (when the batch
buffers exist) to the last, divided by the sensors added meanwhile (the slack
of growing arrays and dicts included), and the part that is the window rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[2])
from stream_forecaster.config import load_config
from stream_forecaster.metrics import Metrics
from stream_forecaster.pipeline import Pipeline
from stream_forecaster.testing import FakeRecord, ListSink

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

config = load_config(None, environ={})

class Shape:  # what the pipeline reads of a forecaster; no model call happens with one reading per sensor
    features = config.data.features if sys.argv[3] == "default" else ("Global_active_power",)
    targets = config.data.targets
    sequence_length = config.model.sequence_length
    version = "0"

n = int(sys.argv[1])
pipeline = Pipeline(config, Shape(), ListSink(), Metrics(Shape.targets))
line = b"16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000"
for start in range(0, n, 10000):
    pipeline.process([FakeRecord("in", 0, i, f"sensor-{i:07d}".encode(), line)
                      for i in range(start, min(n, start + 10000))])
    if start == 0:  # the batch buffers now exist: from here on, growth is the sensors' own
        gc.collect()
        before, first = rss(), len(pipeline.windows)
gc.collect()
after = rss()
w = pipeline.windows
print(json.dumps({"sensors": len(w) - first, "bytes": after - before, "columns": w.width,
                  "rows_bytes_per_sensor": w.size * w.width * 4, "capacity": w.capacity}))
"""


def measure(sensors: int, columns: str = "default") -> dict:
    """``columns``: "default" (the default model's) or "one" (Global_active_power alone)."""
    root = str(Path(__file__).resolve().parents[1])
    return json.loads(subprocess.run([sys.executable, "-c", CHILD, str(sensors), root, columns], check=True,
                                     capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    print(f"{'columns':>7} {'sensors':>10} {'RSS growth MB':>14} {'bytes/sensor':>13} {'of which window rows':>21} "
          f"{'slots allocated':>16}")
    for columns in ("default", "one"):
        for n in args.sensors:
            r = measure(n, columns)
            print(f"{r['columns']:>7} {r['sensors']:>10,} {r['bytes'] / 1e6:>14.1f} {r['bytes'] / r['sensors']:>13.0f} "
                  f"{r['rows_bytes_per_sensor']:>21} {r['capacity']:>16,}")


if __name__ == "__main__":
    main()
