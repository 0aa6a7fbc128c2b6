"""Benchmark: load and window a 2-million-row UCI file; print wall time and peak memory.

    python benchmarks/load_windows.py [--rows 2000000] [--source ZIP]

The source (the shared UCI slice, else the bundled sample) is tiled, its dates
moved on so time keeps running, to --rows data lines in a temporary .txt. Each
measurement runs in a fresh interpreter so its peak resident memory is its own.
Target: under 10 s and a peak under three times the numeric array.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stream_forecaster.files import SAMPLE_PATH, open_text  # noqa: E402
from stream_forecaster.messages import UCI_COLUMNS  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "household_power_consumption.zip"

CHILD = r"""
import json, sys, time
from stream_forecaster.files import read_uci
from stream_forecaster.window import sliding_windows, split_windows

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

path, columns = sys.argv[1], json.loads(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark, so the peak below is this load's own
before = status("VmRSS")
start = time.perf_counter()
series = read_uci(path, columns)
windows = sliding_windows(series.values, 50)
train, validation, test = split_windows(series.segments, len(series), 50, 0.9, 0.05)
seconds = time.perf_counter() - start
peak = status("VmHWM") - before
print(json.dumps({"rows": len(series), "windows": len(windows), "seconds": seconds, "peak_bytes": peak,
                  "array_bytes": series.values.nbytes + series.timestamps.nbytes}))
"""


def tile(source: Path, rows: int, out: Path) -> None:
    with open_text(source) as f:
        header, *lines = f.read().splitlines()
    first = dt.datetime.strptime(lines[0].split(";")[0], "%d/%m/%Y").date()
    last = dt.datetime.strptime(lines[-1].split(";")[0], "%d/%m/%Y").date()
    span = (last - first).days + 1
    with open(out, "w") as f:
        f.write(header + "\n")
        written, copy = 0, 0
        while written < rows:
            shift = dt.timedelta(days=span * copy)
            cache: dict[str, str] = {}
            for line in lines[: rows - written]:
                date, rest = line.split(";", 1)
                moved = cache.get(date)
                if moved is None:
                    d = dt.datetime.strptime(date, "%d/%m/%Y").date() + shift
                    moved = cache[date] = f"{d.day}/{d.month}/{d.year}"
                f.write(f"{moved};{rest}\n")
            written += min(len(lines), rows - written)
            copy += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--source", type=Path, default=SHARED if SHARED.exists() else SAMPLE_PATH)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiled.txt"
        tile(args.source, args.rows, path)
        print(f"{args.rows:,} data lines tiled from {args.source} ({path.stat().st_size / 1e6:.0f} MB)")
        print(f"{'columns':<22} {'rows':>10} {'seconds':>8} {'array MB':>9} {'peak MB':>8} {'peak/array':>10}")
        for label, columns in (("Global_active_power", ["Global_active_power"]), ("all 7", list(UCI_COLUMNS))):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(columns)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out)
            print(f"{label:<22} {r['rows']:>10,} {r['seconds']:>8.2f} {r['array_bytes'] / 1e6:>9.1f} "
                  f"{r['peak_bytes'] / 1e6:>8.1f} {r['peak_bytes'] / r['array_bytes']:>10.2f}")


if __name__ == "__main__":
    main()
