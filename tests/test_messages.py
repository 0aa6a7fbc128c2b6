import gzip
import json
import math
import zipfile

import numpy as np
import pytest
from conftest import HEADER, sample_lines, write_uci
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_forecaster.files import SAMPLE_PATH, read_uci
from stream_forecaster.messages import (
    EARLIEST,
    LATEST,
    MISSING,
    UCI_COLUMNS,
    Invalid,
    Kind,
    MessageParser,
    Reading,
    RecordError,
    UciLineParser,
    encode_predictions,
    format_time,
    format_times,
)

GOOD = "16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000"


def test_parses_the_wanted_columns_in_order():
    parser = UciLineParser(["Voltage", "Global_active_power"])
    stamp, values = parser.parse(GOOD + " \n")
    assert values == [234.84, 4.216]
    assert stamp == np.datetime64("2006-12-16T17:24:00").astype("datetime64[s]").astype(int)


@pytest.mark.parametrize("line", [
    "21/12/2006;11:23:00;?;?;?;?;?;?;",  # the data set's own missing row
    "16/12/2006;17:24:00;?;0.418;234.840;18.400;0.000;1.000;17.000",
    "16/12/2006;17:24:00;;0.418;234.840;18.400;0.000;1.000;17.000",
])
def test_missing_values_in_a_used_column(line):
    assert UciLineParser(["Global_active_power"]).parse(line) is MISSING


def test_missing_value_in_an_unused_column_is_ignored():
    line = "16/12/2006;17:24:00;4.2;?;234.840;18.400;0.000;1.000;17.000"
    assert UciLineParser(["Global_active_power"]).parse(line)[1] == [4.2]


@pytest.mark.parametrize("line, reason", [
    ("16/12/2006;17:24:00;4.216;0.418", "expected 9 fields"),
    ("16/12/2006,17:24:00,4.216,0.418,234.840,18.400,0.000,1.000,17.000", "expected 9 fields"),
    ("16/12/2006;17:24:00;4,216;0.418;234.840;18.400;0.000;1.000;17.000", "bad number"),
    ("16/12/2006;17:24:00;nan;0.418;234.840;18.400;0.000;1.000;17.000", "non-finite"),
    ("16/12/2006;17:24:00;inf;0.418;234.840;18.400;0.000;1.000;17.000", "non-finite"),
    ("31/2/2007;17:24:00;4.2;0.418;234.840;18.400;0.000;1.000;17.000", "bad date"),
    ("2007-02-01;17:24:00;4.2;0.418;234.840;18.400;0.000;1.000;17.000", "bad date"),
    ("16/12/2006;25:00:00;4.2;0.418;234.840;18.400;0.000;1.000;17.000", "bad time"),
    ("16/12/2006;17h24;4.2;0.418;234.840;18.400;0.000;1.000;17.000", "bad time"),
])
def test_malformed_lines_say_why(line, reason):
    with pytest.raises(RecordError, match=reason):
        UciLineParser(["Global_active_power"]).parse(line)


def test_unknown_column_lists_the_available_ones():
    with pytest.raises(RecordError, match="Power.*available: Global_active_power"):
        UciLineParser(["Power"])


@pytest.mark.parametrize("kind", ["txt", "gz", "zip"])
def test_reads_txt_gz_and_zip_alike(tmp_path, kind):
    lines = sample_lines(30)
    text = "\n".join([HEADER] + lines) + "\n"
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text(text)
    elif kind == "gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("household_power_consumption.txt", text)
    series = read_uci(path, ["Global_active_power", "Voltage"])
    assert series.values.shape == (30, 2) and series.values.dtype == np.float32
    expected = [[float(line.split(";")[2]), float(line.split(";")[4])] for line in lines]
    np.testing.assert_allclose(series.values, expected, rtol=1e-6)
    assert np.all(np.diff(series.timestamps) == 60)


def test_missing_rows_are_skipped_and_counted(tmp_path):
    lines = sample_lines(10)
    lines[3] = "16/12/2006;17:27:00;?;?;?;?;?;?;"
    lines[7] = lines[7].replace(lines[7].split(";")[4], "?", 1)  # Voltage missing only
    path = write_uci(tmp_path / "d.txt", lines)
    only_power = read_uci(path, ["Global_active_power"])
    assert (len(only_power), only_power.missing) == (9, 1)
    with_voltage = read_uci(path, ["Global_active_power", "Voltage"])
    assert (len(with_voltage), with_voltage.missing) == (8, 2)


def test_malformed_line_raises_with_its_line_number(tmp_path):
    lines = sample_lines(5)
    lines[2] = "garbage"
    path = write_uci(tmp_path / "d.txt", lines)
    with pytest.raises(RecordError, match=r"d\.txt:4: expected 9 fields.*on_error: skip"):
        read_uci(path, ["Global_active_power"])


def test_malformed_lines_can_be_skipped_and_counted(tmp_path):
    lines = sample_lines(6)
    lines[1] = "garbage"
    lines[4] = lines[4].replace(";", ";x", 1)
    path = write_uci(tmp_path / "d.txt", lines)
    series = read_uci(path, ["Global_active_power"], on_error="skip")
    assert (len(series), series.malformed, series.missing) == (4, 2, 0)
    assert series.errors[0].endswith("d.txt:3: expected 9 fields separated by ';', got 1")


def test_non_utf8_bytes_fail_their_line_only(tmp_path):
    lines = sample_lines(4)
    path = tmp_path / "d.txt"
    raw = "\n".join([HEADER] + lines).encode()
    path.write_bytes(raw.replace(b"4.216", b"4.\xff16", 1) + b"\n")
    series = read_uci(path, ["Global_active_power"], on_error="skip")
    assert (len(series), series.malformed) == (3, 1)


def test_a_byte_order_mark_blank_lines_and_a_repeated_header_are_not_errors(tmp_path):
    lines = sample_lines(6)
    path = tmp_path / "d.txt"
    # a spreadsheet's BOM, two files concatenated (the second with its header), a blank line at the end
    text = "\n".join([HEADER, *lines[:3], HEADER, *lines[3:], "", ""])
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    series = read_uci(path, ["Global_active_power"])  # on_error "raise": any error would raise
    assert (len(series), series.malformed) == (6, 0)
    assert series.values[:, 0].tolist() == pytest.approx([float(line.split(";")[2]) for line in lines])


def test_header_decides_the_column_order(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("Date;Time;Voltage;Global_active_power\n16/12/2006;17:24:00;230.5;4.25\n")
    series = read_uci(path, ["Global_active_power"])
    assert series.values.tolist() == [[4.25]]


def test_file_without_header_uses_the_uci_order(tmp_path):
    path = write_uci(tmp_path / "d.txt", sample_lines(3), header=None)
    assert len(read_uci(path, UCI_COLUMNS)) == 3


def test_ratio_keeps_the_first_fraction_of_lines(tmp_path):
    path = write_uci(tmp_path / "d.txt", sample_lines(100))
    series = read_uci(path, ["Global_active_power"], ratio=0.25)
    full = read_uci(path, ["Global_active_power"])
    assert series.lines == 25
    np.testing.assert_array_equal(series.values, full.values[:25])


def test_missing_file(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        read_uci(tmp_path / "nope.txt", ["Voltage"])


def test_bundled_sample_is_four_weeks_of_real_data():
    series = read_uci(SAMPLE_PATH, UCI_COLUMNS)
    assert series.lines == 28 * 1440
    assert series.summary()["first"] == "2006-12-16T17:24:00"
    assert len(series) + series.missing == series.lines


@settings(max_examples=300, deadline=None)
@given(ident=st.text(), sensor=st.text(), timestamp=st.none() | st.text(), version=st.none() | st.text(),
       prediction=st.lists(st.floats(width=32), min_size=1, max_size=3), partition=st.integers(0, 2**31 - 1),
       offset=st.integers(0, 2**63 - 1), interval=st.none() | st.floats(-10, 10, width=32))
def test_encoded_prediction_is_exactly_what_json_dumps_writes(ident, sensor, timestamp, version, prediction,
                                                             partition, offset, interval):
    targets = [f"t{i}" for i in range(len(prediction))]

    def plain(values):
        numbers = [v if math.isfinite(v) else None for v in values]
        return numbers[0] if len(targets) == 1 else dict(zip(targets, numbers))

    values = np.array(prediction, dtype=np.float32)
    expected = {"id": ident, "sensor": sensor, "timestamp": timestamp, "prediction": plain(prediction)}
    bounds = None
    if interval is not None:
        bounds = (values - abs(interval), values + abs(interval))
        expected.update(lower=plain(bounds[0].tolist()), upper=plain(bounds[1].tolist()))
    expected.update(model_version=version, source={"partition": partition, "offset": offset})
    rows = [values.tolist(), values.tolist()]  # a batch of two: the same message twice
    encoded = encode_predictions([ident] * 2, [sensor] * 2, [timestamp] * 2, rows, targets, version,
                                 [partition] * 2, [offset] * 2, None if bounds is None else
                                 ([bounds[0].tolist()] * 2, [bounds[1].tolist()] * 2))
    assert encoded == [json.dumps(expected, separators=(",", ":")).encode()] * 2


def test_a_json_time_in_utc_may_end_in_z():
    parser = MessageParser(["Global_active_power"])
    zulu = parser.parse(b"s", b'{"value": 1, "timestamp": "2007-01-10T22:17:00Z"}')
    offset = parser.parse(b"s", b'{"value": 1, "timestamp": "2007-01-10T22:17:00+00:00"}')
    assert zulu.aware and (zulu.timestamp, zulu.aware) == (offset.timestamp, offset.aware)


@pytest.mark.parametrize("value", [b'{"value": 1, "timestamp": "9999-12-31T23:59:30"}',
                                   b"31/12/9999;23:59:00;1;2;3;4;5;6;7",
                                   b'{"value": 1, "timestamp": "0001-01-01T00:00:00+01:00"}'])
def test_a_reading_whose_forecast_would_leave_the_calendar_is_invalid(value):
    result = MessageParser(["Global_active_power"]).parse(b"s", value)
    assert isinstance(result, Invalid) and "timestamp out of range" in result.reason


@pytest.mark.parametrize("name, content", [("bad.gz", b"not gzip"), ("bad.zip", b"not zip"), ("dir", None),
                                           ("cut.gz", gzip.compress(("\n".join(sample_lines(2000))).encode())[:3000])])
def test_a_file_that_cannot_be_read_is_a_record_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(RecordError, match=f"{name}: cannot read it"):
        read_uci(path, ["Global_active_power"])


def test_padded_dates_and_times_parse_but_are_not_remembered():
    parser, pad = UciLineParser(["Global_active_power"]), " " * 30_000  # int() takes padding
    padded = parser.parse(f"1/3/{pad}2007;{pad}10:00:00;1;2;3;4;5;6;7")
    assert padded == parser.parse("1/3/2007;10:00:00;1;2;3;4;5;6;7")
    assert max(map(len, [*parser._dates, *parser._times])) <= 10  # hostile input must not pin memory


_fields = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["?", "", "1_0", " 1", "1e999", "-0", "0x1", "nan", "٣", "4.2", "17"]),
                    st.text(alphabet="0123456789.e-+?; \t", max_size=6))
_dates = st.one_of(st.sampled_from(["16/12/2006", "31/2/2007", "1/1/999", "1/1/9999", "Date", "", "01/01/2007"]),
                   st.text(alphabet="0123456789/", max_size=11))
_times = st.one_of(st.sampled_from(["17:24:00", "24:00:00", "Time", "0:0:0", "23:59:59"]),
                   st.text(alphabet="0123456789:", max_size=9))


@st.composite
def _uci_like(draw):
    fields = [draw(_dates), draw(_times)] + [draw(_fields) for _ in range(draw(st.sampled_from([7, 7, 7, 6, 8])))]
    return ";".join(fields).encode("utf-8")




def _good_line(day, month, year, second, numbers):
    return f"{day}/{month}/{year};{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d};".encode() \
        + ";".join(map(repr, numbers)).encode()


_good_lines = st.builds(_good_line, st.integers(1, 28), st.integers(1, 12), st.integers(1000, 8999),
                        st.integers(0, 86399), st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32),
                                                        min_size=7, max_size=7))
_odd_messages = st.sampled_from([GOOD.encode(), b"?", b"", b" " + GOOD.encode(), GOOD.encode() + b"\n",
                                 b'{"value": 1}', b"Date;Time;" + ";".join(UCI_COLUMNS).encode()])
_messages = st.one_of(_good_lines, _good_lines, _uci_like(), _uci_like(), _odd_messages, st.binary(max_size=80),
                      st.none())
_keys = st.one_of(st.none(), st.sampled_from([b"", b"a", b"b", "ü".encode(), b"\xff", b"k" * 1025]))


@pytest.mark.parametrize("columns", [list(UCI_COLUMNS), ["Voltage", "Global_active_power"], ["power"]])
@given(messages=st.lists(st.tuples(_keys, _messages), max_size=30), max_bytes=st.sampled_from([65536, 60]))
def test_a_batch_parses_each_message_as_parse_does(columns, messages, max_bytes):
    parser = MessageParser(columns, max_bytes)
    keys, values = [k for k, _ in messages], [v for _, v in messages]
    batch = parser.parse_batch(keys, values)
    assert len(batch.kinds) == len(batch.sensors) == len(messages)
    for i, (key, value) in enumerate(messages):
        one = MessageParser(columns, max_bytes).parse(key, value)
        if isinstance(one, Reading):
            assert batch.kinds[i] == Kind.READING and batch.sensors[i] == one.sensor
            assert batch.values[i].tolist() == one.values and bool(batch.aware[i]) == one.aware
            assert batch.timestamps[i] == one.timestamp or (math.isnan(batch.timestamps[i]) and one.timestamp is None)
        elif isinstance(one, Invalid):
            assert batch.kinds[i] == Kind.INVALID and batch.invalid[i] == one
        else:
            assert batch.kinds[i] == (Kind.MISSING if one is MISSING else Kind.HEADER)


def test_plain_lines_are_read_together_and_the_rest_one_by_one():
    parser = MessageParser(UCI_COLUMNS)
    one_by_one = []
    parse = parser.parse
    parser.parse = lambda key, value: one_by_one.append(value) or parse(key, value)
    lines = [GOOD.encode(), GOOD.replace("4.216", "?").encode(), b"12.5", GOOD.replace("17:24", "17:25").encode()]
    batch = parser.parse_batch([b"a", b"a", b"b", b"a"], lines)
    assert one_by_one == lines[1:3]
    assert batch.kinds.tolist() == [Kind.READING, Kind.MISSING, Kind.INVALID, Kind.READING]
    assert batch.values[3].tolist() == [4.216, 0.418, 234.84, 18.4, 0.0, 1.0, 17.0]
    assert batch.timestamps[3] - batch.timestamps[0] == 60
    assert "a bare number is one value" in batch.invalid[2].reason


@given(st.lists(st.tuples(st.one_of(st.integers(EARLIEST, LATEST - 86_400).map(float),
                                    st.floats(EARLIEST, LATEST - 86_400), st.just(math.nan)), st.booleans()),
                max_size=20))
def test_times_formatted_together_are_each_formatted_alone(times):
    seconds, aware = np.array([t for t, _ in times], dtype=np.float64), np.array([a for _, a in times], dtype=bool)
    expected = [None if t != t else format_time(t, a) for t, a in times]
    assert format_times(seconds, aware) == expected
