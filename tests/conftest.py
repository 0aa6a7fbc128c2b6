"""Shared fixtures: small UCI files written on the fly, tiny model configs."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from stream_forecaster.config import load_config
from stream_forecaster.records import SAMPLE_PATH

HEADER = "Date;Time;Global_active_power;Global_reactive_power;Voltage;Global_intensity;Sub_metering_1;Sub_metering_2;Sub_metering_3"


def sample_lines(n: int, start: int = 0) -> list[str]:
    """``n`` data lines of the real bundled sample, from data line ``start``."""
    with gzip.open(SAMPLE_PATH, "rt") as f:
        next(f)
        return [line.rstrip("\n") for line in itertools.islice(f, start, start + n)]


def write_uci(path: Path, lines: list[str], header: str | None = HEADER) -> Path:
    path.write_text("\n".join(([header] if header else []) + lines) + "\n")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A model small enough to train in seconds, and a store in tmp_path."""

    def make(*overrides: str):
        return load_config(
            None,
            [
                "model.sequence_length=6",
                "model.layers=[1, 8, 1]",
                "model.epochs=1",
                "model.batch_size=64",
                f"model_store.path={tmp_path / 'models'}",
                *overrides,
            ],
            environ={},
        )

    return make
