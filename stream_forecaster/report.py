"""Human- and machine-readable reports of a backtest: table, JSON, CSV, PNG."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import UserError
from .files import iso_time, strict_json

__all__ = ["format_health", "format_sensors", "format_table", "format_versions", "to_json", "worst_sensors",
           "write_csvs", "write_plot"]

PLOT_POINTS = 100  # the seeds plot the first 100 predictions


def format_table(summary: dict) -> str:
    """RMSE and MAE of the model and the baselines, skill, interval coverage; per target too."""
    rows = [("", "RMSE", "MAE"), ("model", summary["rmse"], summary["mae"]),
            ("persistence", summary["persistence_rmse"], summary["persistence_mae"])]
    if "seasonal_rmse" in summary:
        rows.append((f"seasonal naive (day before; {summary['seasonal_n']} windows)", summary["seasonal_rmse"],
                     summary["seasonal_mae"]))
    if "skill_rmse" in summary:
        rows.append(("skill vs persistence", summary["skill_rmse"], summary["skill_mae"]))
    if len(summary["per_target"]) > 1:
        for name, s in summary["per_target"].items():
            rows.append((f"{name} model", s["rmse"], s["mae"]))
            rows.append((f"{name} persistence", s["persistence_rmse"], s["persistence_mae"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{rows[0][0]:<{width}}  {'RMSE':>10}  {'MAE':>10}"]
    lines += [f"{name:<{width}}  {rmse:>10.5f}  {mae:>10.5f}" for name, rmse, mae in rows[1:]]
    if "coverage" in summary:
        low, high = summary["interval"]
        per_target = "".join(f"; {name} {s['coverage']:.1%}" for name, s in summary["per_target"].items()
                             if len(summary["per_target"]) > 1)
        lines.append(f"interval {low:.0%}-{high:.0%}: {summary['coverage']:.1%} of the truths inside "
                     f"(nominal {high - low:.0%}){per_target}")
    return "\n".join(lines)


def worst_sensors(per_sensor: dict, count: int) -> list[str]:
    """The ``count`` sensors with the lowest RMSE skill against persistence (undefined skill last)."""
    def skill(name):
        value = per_sensor[name]["skill_rmse"]
        return (value != value, value)  # NaN (a perfect persistence) sorts after every number

    return sorted(per_sensor, key=skill)[:count]


def format_sensors(per_sensor: dict, count: int) -> str:
    """The worst ``count`` sensors: n, RMSE, MAE and skills; and how many of all lose to persistence."""
    losing = sum(1 for s in per_sensor.values() if s["skill_rmse"] < 0)
    rows = [("sensor", "n", "RMSE", "MAE", "skill RMSE", "skill MAE")]
    for name in worst_sensors(per_sensor, count):
        s = per_sensor[name]
        rows.append((name, str(s["n"]), f"{s['rmse']:.5g}", f"{s['mae']:.5g}", f"{s['skill_rmse']:+.1%}",
                     f"{s['skill_mae']:+.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{len(per_sensor)} sensors, {losing} worse than persistence (RMSE); the {len(rows) - 1} lowest skills:"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def format_health(records: list[dict], sensors: int, losing: int) -> str:
    """Health records (worst first) of the ``sensors`` in the health topic, ``losing`` of them worse than
    persistence: skill, RMSE beside persistence's, MAE, coverage, scored forecasts and last reading. Figures of
    several targets show each target's, separated by '/'."""
    rows = [("sensor", "skill", "RMSE", "persistence", "MAE", "coverage", "scored", "last reading", "model")]
    for r in records:
        rows.append((r["sensor"], _figure(r.get("skill"), "{:+.1%}"), _figure(r.get("rmse"), "{:.5g}"),
                     _figure(r.get("persistence_rmse"), "{:.5g}"), _figure(r.get("mae"), "{:.5g}"),
                     _figure(r.get("coverage"), "{:.0%}"), str(r.get("scored", "-")), str(r.get("last_reading") or "-"),
                     str(r.get("model_version") or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{sensors} sensors, {losing} worse than persistence (RMSE); the {len(rows) - 1} lowest skills:"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def _figure(value, form: str) -> str:
    values = list(value.values()) if isinstance(value, dict) else [value]
    return "/".join("-" if not isinstance(v, (int, float)) else form.format(v) for v in values)


def format_versions(store) -> str:
    """One line per model version (``*`` the current one, ``s`` the shadow candidate): creation time, data range,
    test scores, gate decision."""
    current, shadow = store.current(), store.shadow()
    rows = [("", "version", "created", "trained on", "test RMSE", "persistence", "gate")]
    for version in store.versions():
        try:
            meta = store.metadata(version)
        except Exception as exc:  # a damaged version is listed, not fatal to the listing
            rows.append((_mark(version, current, shadow), version, f"unreadable: {exc}", "", "", "", ""))
            continue
        data, test, gate = meta.data, meta.test, meta.gate or {}
        train_range = " .. ".join(data.get("train_range", ["?", "?"]))
        gate_text = gate.get("decision", "manual (train)")
        if gate.get("current") is not None:
            gate_text += f" ({gate['metric']} {gate['candidate']:.4g} vs {gate['current']:.4g})"
        rows.append((_mark(version, current, shadow), version, meta.created or "?", train_range,
                     _num(test.get("rmse")), _num(test.get("persistence_rmse")), gate_text))
    if len(rows) == 1:
        return f"no model versions in {store.path}"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _mark(version: str, current: str | None, shadow: str | None) -> str:
    return "*" if version == current else "s" if version == shadow else ""


def _num(value) -> str:
    return "-" if value is None else f"{value:.5f}"


def to_json(summary: dict, **extra) -> str:
    """Strict JSON: an undefined figure (no seasonal pair, a perfect baseline) is null, not NaN."""
    return strict_json({**summary, **extra}, sort_keys=True)


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
