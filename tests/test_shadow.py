"""A candidate in shadow through the daemon and a real model store: a better one is promoted after
``retrain.shadow_for`` scored forecasts, a worse one dropped, and nothing but the serving model is published."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import level_model

from stream_forecaster.cli import main
from stream_forecaster.config import load_config
from stream_forecaster.service import Daemon
from stream_forecaster.store import ModelStore
from stream_forecaster.testing import FakeRecord, ListSink, ListSource

L = 6
SENSORS = [f"meter-{i}" for i in range(8)]


def readings(n=120, seed=5):
    """Readings scattered around 1.0: a forecast of their level beats persistence, which chases the noise."""
    rng = np.random.default_rng(seed)
    values = {s: 1.0 + 0.1 * rng.standard_normal(n) for s in SENSORS}
    records = [FakeRecord("in", 0, len(SENSORS) * t + k, s.encode(), repr(float(values[s][t])).encode())
               for t in range(n) for k, s in enumerate(SENSORS)]
    return values, records


@pytest.mark.parametrize("level, verdict", [(1.0, "promoted"), (1.6, "dropped")])
def test_a_shadow_candidate_is_promoted_only_when_it_beats_the_serving_model_and_persistence(
        tmp_path, level, verdict, capsys):
    values, records = readings()
    store = ModelStore(tmp_path / "models")
    store.publish(level_model(3.0, values.values(), L).save)  # serving: far off, worse than persistence
    store.publish(level_model(level, values.values(), L).save, make_current=False)
    overrides = ["model.sequence_length=6", "data.features=[Global_active_power]", "model.layers=[1, 8, 1]",
                 f"model_store.path={store.path}", "model_store.poll_interval=1h", "metrics.port=0",
                 "retrain.shadow_sample=1", "retrain.shadow_for=300", "model.jit_compile=false"]
    settings = [a for o in overrides for a in ("--set", o)]
    assert main(["models", "shadow", "1", *settings]) == 2  # the current one: nothing to compare with
    assert main(["models", "shadow", "9", *settings]) == 2
    assert main(["models", "shadow", "2", *settings]) == 0
    assert "shadow candidate: version 2" in capsys.readouterr().out
    assert main(["models", "list", *settings]) == 0
    listing = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[:2] for row in listing] == [["*", "1"], ["s", "2"]]
    stop = threading.Event()
    sink = ListSink()
    daemon = Daemon(load_config(None, overrides, environ={}), source=ListSource(
        [records[i:i + 64] for i in range(0, len(records), 64)], stop_when_done=stop), sink=sink, stop=stop)
    try:
        assert daemon.initialize()
        daemon.watcher.check()  # what its thread does every poll_interval
        daemon.loop()
    finally:
        daemon.shutdown()
    metrics = daemon.metrics.registry
    assert metrics.get_sample_value("stream_forecaster_shadow_decisions_total", {"decision": verdict}) == 1
    scored = metrics.get_sample_value("stream_forecaster_shadow_scored_predictions_total")
    assert 300 <= scored < 300 + 64  # decided after the batch that reached retrain.shadow_for
    assert {json.loads(r.value)["model_version"] for r in sink.records} == {"1"}  # the shadow publishes nothing
    assert store.shadow() is None
    assert store.current() == ("2" if verdict == "promoted" else "1")
    daemon.watcher.check()
    swapped = daemon.watcher.take()
    assert (swapped.version if swapped else None) == ("2" if verdict == "promoted" else None)
