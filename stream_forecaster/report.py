"""Human- and machine-readable reports of a backtest: table, JSON, CSV, PNG."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import UserError
from .records import iso_time

__all__ = ["format_table", "to_json", "write_csvs", "write_plot"]

PLOT_POINTS = 100  # the seeds plot the first 100 predictions


def format_table(summary: dict) -> str:
    """The model's and persistence's RMSE and MAE, overall and per target."""
    rows = [("", "RMSE", "MAE"), ("model", summary["rmse"], summary["mae"]),
            ("persistence", summary["persistence_rmse"], summary["persistence_mae"])]
    if len(summary["per_target"]) > 1:
        for name, s in summary["per_target"].items():
            rows.append((f"{name} model", s["rmse"], s["mae"]))
            rows.append((f"{name} persistence", s["persistence_rmse"], s["persistence_mae"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{rows[0][0]:<{width}}  {'RMSE':>10}  {'MAE':>10}"]
    lines += [f"{name:<{width}}  {rmse:>10.5f}  {mae:>10.5f}" for name, rmse, mae in rows[1:]]
    return "\n".join(lines)


def to_json(summary: dict, **extra) -> str:
    return json.dumps({**summary, **extra}, sort_keys=True)


def write_csvs(backtest, directory: str | os.PathLike) -> tuple[Path, Path]:
    """``predicted.csv`` and ``test_data.csv``: one row per predicted reading."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "predicted.csv", directory / "test_data.csv"
    for path, values in zip(paths, (backtest.predicted, backtest.truth)):
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["timestamp", *backtest.targets])
            for stamp, row in zip(backtest.timestamps, values):
                out.writerow([iso_time(stamp), *(f"{v:.6g}" for v in row)])
    return paths


def write_plot(backtest, path: str | os.PathLike) -> Path:
    """PNG of the first predictions against the truth, one panel per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'stream-forecaster[plot]'") from None
    n = min(PLOT_POINTS, len(backtest.truth))
    fig, axes = plt.subplots(len(backtest.targets), 1, figsize=(10, 3 * len(backtest.targets)), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[:, 0], backtest.targets)):
        ax.plot(backtest.truth[:n, i], label="true data")
        ax.plot(backtest.predicted[:n, i], label="prediction")
        ax.plot(backtest.persistence[:n, i], label="persistence", alpha=0.5, linestyle=":")
        ax.set_ylabel(name)
        ax.legend(loc="upper right")
    axes[-1, 0].set_xlabel(f"minute (first {n} predictions, model version {backtest.model_version})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
