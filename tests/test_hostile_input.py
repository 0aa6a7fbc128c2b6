"""Property-based: whatever arrives, nothing crashes, every message is counted under the right
outcome, and the valid readings around the bad ones are still forecast."""

from __future__ import annotations

import json
import math

from conftest import make_forecaster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_forecaster.config import load_config
from stream_forecaster.messages import HEADER, MISSING, Invalid, MessageParser, Reading
from stream_forecaster.metrics import Metrics
from stream_forecaster.pipeline import Pipeline
from stream_forecaster.testing import FakeRecord, ListSink

L = 6
COLUMNS = ["Global_active_power"]


@given(key=st.one_of(st.none(), st.binary(max_size=64)), value=st.one_of(st.none(), st.binary(max_size=300)))
@settings(max_examples=500)
def test_parser_never_raises_and_readings_are_finite(key, value):
    result = MessageParser(COLUMNS).parse(key, value)
    assert result is MISSING or result is HEADER or isinstance(result, (Reading, Invalid))
    if isinstance(result, Reading):
        assert len(result.values) == 1 and all(math.isfinite(v) and abs(v) < 3.5e38 for v in result.values)


values = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)


@given(v=values)
def test_any_finite_value_round_trips_in_every_format(v):
    parser = MessageParser(COLUMNS)
    line = f"16/12/2006;17:24:00;{v!r};0.4;234.8;18.4;0;1;17"
    for message in (line, repr(v), json.dumps({"value": v}), json.dumps({"values": {COLUMNS[0]: v}})):
        reading = parser.parse(b"k", message.encode())
        assert isinstance(reading, Reading) and reading.values == [v]


# Messages whose outcome is known by construction.
invalid_messages = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\xff" + b),  # never UTF-8
    st.sampled_from([b"nan", b"NaN", b"inf", b"-inf", b"1e999", b'{"value": NaN}', b'{"value": Infinity}',
                     b"4,2", b"1 2", b"16/12/2006,17:24:00,1,2,3,4,5,6,7", b"31/2/2007;10:00:00;1;2;3;4;5;6;7",
                     b"", b'{"values": []}', b"[1, 2]", b'{"value": "1"}', b"x" * (1 << 20),
                     b'{"value": 1' + b"9" * 400 + b"}",  # too large for a float
                     b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than the JSON reader recurses
                     # a forecast's time would fall outside the calendar
                     b'{"value": 1, "timestamp": "9999-12-31T23:59:30"}', b"31/12/9999;23:59:00;1;2;3;4;5;6;7",
                     b'{"value": 1, "timestamp": "0001-01-01T00:00:00+01:00"}']),
    st.text(alphabet="abcdefghij ,.-_", min_size=1, max_size=50).map(lambda t: ("z" + t).encode()),
)
missing_messages = st.sampled_from([b"?", b" ? ", b'{"value": null}', b'{"values": {}}',
                                    b"21/12/2006;11:23:00;?;?;?;?;?;?;"])
keys = st.one_of(st.sampled_from([b"a", b"b", b"c"]), st.binary(min_size=1, max_size=8).map(lambda b: b"\xfe" + b))


@st.composite
def streams(draw):
    """(key, value, outcome) triples: valid readings per sensor with hostile messages between them, and repeats
    of a sensor's last UCI line (stale: not newer than the sensor's last reading)."""
    out, last_minute = [], {}

    def uci(minute, value):
        return f"16/12/2006;{17 + (24 + minute) // 60}:{(24 + minute) % 60:02d}:00;{value!r};0.4;234.8;18.4;0;1;17"

    for minute in range(draw(st.integers(min_value=0, max_value=60))):
        kind = draw(st.sampled_from(["valid", "valid", "valid", "invalid", "missing", "stale"]))
        key = draw(keys)
        if kind == "stale" and last_minute.get(key) is not None:
            message = uci(last_minute[key], draw(values)).encode()
        elif kind in ("valid", "stale"):
            kind, value = "valid", draw(values)
            fmt = draw(st.sampled_from(["uci", "number", "json"]))
            last_minute[key] = minute if fmt == "uci" else None  # only UCI lines carry a time here
            message = {"uci": uci(minute, value), "number": repr(value),
                       "json": json.dumps({"values": {COLUMNS[0]: value}})}[fmt].encode()
        else:
            message = draw(invalid_messages if kind == "invalid" else missing_messages)
        out.append((key, message, kind))
    return out


@given(stream=streams(), batch=st.integers(min_value=1, max_value=20))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_running_loop_counts_every_message_and_forecasts_the_valid_ones(stream, batch):
    forecaster = FORECASTER
    metrics = Metrics(forecaster.targets)
    sink = ListSink()
    config = load_config(None, ["model.sequence_length=6", "data.features=[Global_active_power]",
                                "model.layers=[1, 8, 1]", "kafka.dead_letter_topic=dead"],
                         environ={})
    pipeline = Pipeline(config, forecaster, sink, metrics)
    records = [FakeRecord("in", 0, i, k, v) for i, (k, v, _) in enumerate(stream)]
    for i in range(0, len(records), batch):
        assert pipeline.process(records[i:i + batch]) == {("in", 0): min(i + batch, len(records))}
    kinds = [k for _, _, k in stream]

    def counted(outcome):
        return metrics.registry.get_sample_value("stream_forecaster_readings_total", {"outcome": outcome})

    assert counted("accepted") == kinds.count("valid")
    assert counted("invalid") == kinds.count("invalid")
    assert counted("missing") == kinds.count("missing")
    assert (counted("stale") or 0) == kinds.count("stale")
    per_sensor = {}
    for key, _, kind in stream:
        if kind == "valid":
            name = key.decode("utf-8", "backslashreplace")
            per_sensor[name] = per_sensor.get(name, 0) + 1
    predictions = [r for r in sink.records if r.topic == config.kafka.output_topic]
    assert len(predictions) == sum(max(0, n - (L - 1) + 1) for n in per_sensor.values())
    for r in predictions:
        json.loads(r.value, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict JSON
    assert sum(r.topic == "dead" for r in sink.records) == kinds.count("invalid")


FORECASTER = make_forecaster(sequence_length=L)
