"""Accuracy at any site size: train before a date, backtest after it with the size-like columns scaled.

A sensor ``k`` times larger than the ones a model trained on should get
forecasts ``k`` times larger and as good. This trains one model (the
configuration as given) on the readings before ``--split``, then backtests it
on the readings from ``--split`` on with every column but ``--unscaled``
multiplied by each ``--factors`` value, without retraining, and prints RMSE and
MAE skill against persistence and the interval's coverage per factor.

    python benchmarks/accuracy.py --data ../shared/data/household_power_consumption.zip --json accuracy.json
    python benchmarks/accuracy.py ... --set data.normalization=standardize   # the global normalisation
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stream_forecaster.config import load_config  # noqa: E402
from stream_forecaster.retrain import read_file  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training and test data (any format train reads)")
    parser.add_argument("--split", default="2007-04-01", help="train before this date, test from it on")
    parser.add_argument("--factors", default="0.01,0.1,1,10,100", help="site-size factors, comma-separated")
    parser.add_argument("--unscaled", default="Voltage", help="columns not scaled, comma-separated")
    parser.add_argument("--model", help="backtest this version directory instead of training one")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "config.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--save", metavar="DIR", help="save the trained model version here")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args()

    from stream_forecaster.model import Forecaster  # noqa: PLC0415 (TensorFlow after the arguments)
    from stream_forecaster.training import backtest, train
    from stream_forecaster.window import window_starts

    config = load_config(args.config, args.overrides, environ={})
    split = int(dt.datetime.fromisoformat(args.split).replace(tzinfo=dt.timezone.utc).timestamp())
    columns = list(dict.fromkeys(config.data.features + config.data.targets))
    series = read_file(args.data, columns, config.data)
    result = {"config": config.redacted(), "split": args.split}
    if args.model:
        forecaster = Forecaster.load(args.model, Path(args.model).name, config.model.jit_compile)
    else:
        started = time.monotonic()
        trained = train(config, series.select(series.timestamps < split), verbose=2)
        forecaster = trained.forecaster
        result["training_seconds"] = round(time.monotonic() - started, 1)
        result["epochs"] = len(forecaster.metadata.training["history"]["loss"])
        print(f"trained in {result['training_seconds']:.0f} s, {result['epochs']} epochs", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            forecaster.save(args.save)
    length = forecaster.sequence_length
    starts = np.concatenate(window_starts(series.segments, len(series), length))
    starts = starts[series.timestamps[starts + length - 1] >= split]
    unscaled = set(args.unscaled.split(",")) if args.unscaled else set()
    factor_of_column = np.array([1.0 if c in unscaled else 0.0 for c in series.columns])
    rows = []
    for factor in (float(f) for f in args.factors.split(",")):
        multiplier = np.where(factor_of_column == 1.0, 1.0, factor).astype(np.float32)
        scaled = dataclasses.replace(series, values=series.values * multiplier)
        summary = backtest(forecaster, scaled, starts).summary()
        rows.append({"factor": factor, "n": summary["n"], "skill_rmse": summary["skill_rmse"],
                     "skill_mae": summary["skill_mae"], "coverage": summary.get("coverage"),
                     "rmse": summary["rmse"], "mae": summary["mae"]})
        print(f"x{factor:<6g} n={summary['n']}  skill RMSE {summary['skill_rmse']:+.1%}  MAE "
              f"{summary['skill_mae']:+.1%}  coverage {summary.get('coverage', float('nan')):.1%}", flush=True)
    result["factors"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
