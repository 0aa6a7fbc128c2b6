"""read_series: UCI, CSV and JSON lines files of one sensor or a fleet, told apart by their content."""

import gzip
import json
import zipfile

import numpy as np
import pytest

from stream_forecaster.files import SAMPLE_PATH, Series, read_series, read_uci
from stream_forecaster.messages import DEFAULT_SENSOR, UCI_COLUMNS, RecordError

T0 = 1175385600  # 2007-04-01T00:00:00 as wall-clock seconds


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("sep", [",", ";"])
def test_csv_with_comma_or_semicolon(tmp_path, sep):
    path = write(tmp_path / "d.dat", sep.join(["timestamp", "temp", "hum"]),
                 sep.join(["2007-04-01T00:00:00", "20.5", "40"]),
                 sep.join(["2007-04-01T00:01:00", "21", "41.5"]))
    series = read_series(path, ["hum", "temp"])
    assert series.values.dtype == np.float32 and series.timestamps.dtype == np.int64
    assert series.values.tolist() == [[40, 20.5], [41.5, 21]]
    assert series.timestamps.tolist() == [T0, T0 + 60]
    assert (series.columns, series.sensors, series.segments) == (("hum", "temp"), (DEFAULT_SENSOR,), (0,))
    assert (series.lines, series.missing, series.malformed, series.source) == (2, 0, 0, str(path))


def test_quoted_names_and_fields_and_blanks_around_them(tmp_path):
    path = write(tmp_path / "d.csv", '"Time", "Power"', '"2007-04-01 00:00:00" , "1.5" ', "", "  ",
                 "2007-04-01 00:01:00,2.5")
    series = read_series(path, ["Power"])
    assert series.values[:, 0].tolist() == [1.5, 2.5] and series.timestamps.tolist() == [T0, T0 + 60]
    assert series.lines == 2  # blank lines are not data lines


@pytest.mark.parametrize("written, seconds", [
    ("2007-04-01T00:00:00", T0),  # naive: wall clock, as the UCI reader does
    ("2007-04-01 00:00:00", T0),
    ("2007-04-01T00:00:00Z", T0),
    ("2007-04-01T02:00:00+02:00", T0),  # aware: UTC seconds
    ("2007-04-01T00:00:00.9", T0),
    (str(T0), T0),  # epoch seconds
    (f"{T0}.75", T0),  # truncated to whole seconds
])
def test_csv_times(tmp_path, written, seconds):
    path = write(tmp_path / "d.csv", "ts,v", f"{written},1")
    assert read_series(path, ["v"]).timestamps.tolist() == [seconds]


def test_a_sensor_column_gives_one_segment_per_sensor_in_time_order(tmp_path):
    # a fleet's file interleaves its sensors; b's readings are also out of order
    path = write(tmp_path / "fleet.csv", "sensor,time,v",
                 f"b,{T0 + 60},11", f"a,{T0},1", f"b,{T0},10", f"a,{T0 + 60},2", f"c,{T0},20", f"a,{T0 + 120},3")
    series = read_series(path, ["v"])
    assert series.sensors == ("a", "b", "c") and series.segments == (0, 3, 5)
    assert series.values[:, 0].tolist() == [1, 2, 3, 10, 11, 20]
    assert series.timestamps.tolist() == [T0, T0 + 60, T0 + 120, T0, T0 + 60, T0]


def test_a_sensors_time_again_is_dropped_and_counted(tmp_path):
    path = write(tmp_path / "d.csv", "sensor,time,v", f"a,{T0},1", f"b,{T0},5", f"a,{T0},2", f"a,{T0 + 60},3")
    series = read_series(path, ["v"])
    assert series.values[:, 0].tolist() == [1, 3, 5]  # the first of the two stays
    assert (series.duplicates, series.sensors, series.segments) == (1, ("a", "b"), (0, 2))


def test_named_time_and_sensor_columns(tmp_path):
    path = write(tmp_path / "d.csv", "when;device;time;v", f"{T0};x;junk;1", f"{T0 + 60};y;junk;2")
    series = read_series(path, ["v"], time_column="when", sensor_column="device")
    assert series.sensors == ("x", "y") and series.timestamps.tolist() == [T0, T0 + 60]
    with pytest.raises(RecordError, match=r"no sensor column 'id'; the file has: when, device, time, v"):
        read_series(path, ["v"], time_column="when", sensor_column="id")
    with pytest.raises(RecordError, match=r"no time column 'at'; the file has: when, device, time, v"):
        read_series(path, ["v"], time_column="at")


@pytest.mark.parametrize("gap", ["?", "", "NaN", "nan", " null ", "NA"])
def test_missing_values_are_skipped_and_counted(tmp_path, gap):
    path = write(tmp_path / "d.csv", "time,a,b,unused", f"{T0},1,2,?", f"{T0 + 60},{gap},3,4", f"{T0 + 120},5,6,")
    series = read_series(path, ["a", "b"])
    assert series.values.tolist() == [[1, 2], [5, 6]]
    assert (series.lines, series.missing, series.malformed) == (3, 1, 0)


BAD_LINES = [("2007-04-01T00:03:00,x1", "bad number 'x1' in column v"),
             ("2007-04-01T00:03:00,inf", "non-finite"),
             ("2007-04-01T00:03:00,1e39", "out of range"),
             ("2007-13-01T00:03:00,1", "bad time"),
             (f"{T0 * 1000},1", "out of range"),  # epoch milliseconds
             ("2007-04-01T00:03:00,1,2", "expected 2 fields separated by ',', got 3")]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_a_bad_line_raises_with_its_line_number(tmp_path, line, reason):
    path = write(tmp_path / "d.csv", "time,v", f"{T0},1", "", line, f"{T0 + 300},2")
    with pytest.raises(RecordError, match=rf"d\.csv:4: .*{reason}.*on_error: skip"):
        read_series(path, ["v"])


def test_bad_lines_can_be_skipped_and_counted(tmp_path):
    path = write(tmp_path / "d.csv", "time,v", f"{T0},1", *[line for line, _ in BAD_LINES], f"{T0 + 300},2")
    series = read_series(path, ["v"], on_error="skip")
    assert (len(series), series.malformed, series.lines) == (2, len(BAD_LINES), 2 + len(BAD_LINES))
    assert len(series.errors) == 5 and series.errors[0].endswith("d.csv:3: bad number 'x1' in column v")


def test_a_repeated_header_is_not_an_error(tmp_path):
    path = write(tmp_path / "d.csv", "time,v", f"{T0},1", "time,v", f"{T0 + 60},2")  # two files concatenated
    series = read_series(path, ["v"])
    assert (len(series), series.lines, series.malformed) == (2, 2, 0)


def test_a_wanted_column_that_is_not_there_names_those_that_are(tmp_path):
    path = write(tmp_path / "d.csv", "time,temp,hum", f"{T0},1,2")
    with pytest.raises(RecordError, match=r"d\.csv: no column\(s\) power, volt; the file has: time, temp, hum"):
        read_series(path, ["temp", "power", "volt"])


def test_no_time_column(tmp_path):
    path = write(tmp_path / "d.csv", "when,temp", f"{T0},1")
    with pytest.raises(RecordError, match=r"d\.csv: no time column \(named timestamp, time, datetime, date or ts\); "
                                          r"the file has: when, temp \(set data\.time_column\)"):
        read_series(path, ["temp"])


def test_json_lines_in_the_daemons_shape(tmp_path):
    path = write(tmp_path / "d.jsonl",
                 '{"timestamp": "2007-04-01T00:01:00", "values": {"a": 2, "b": 20}, "sensor": "s2"}',
                 '{"timestamp": "2007-04-01T00:00:00", "values": {"a": 1, "b": 10}, "sensor": "s2"}',
                 "",
                 '{"timestamp": "2007-04-01T00:00:00Z", "values": {"a": 3, "b": 30}}',
                 '{"timestamp": "2007-04-01T00:02:00", "values": {"a": "?", "b": 1}, "sensor": "s2"}',
                 '{"timestamp": "2007-04-01T00:03:00", "values": {"a": null, "b": 1}, "sensor": "s2"}')
    series = read_series(path, ["b", "a"])
    assert series.sensors == (DEFAULT_SENSOR, "s2") and series.segments == (0, 1)
    assert series.values.tolist() == [[30, 3], [10, 1], [20, 2]]
    assert series.timestamps.tolist() == [T0, T0, T0 + 60]
    assert (series.lines, series.missing, series.malformed) == (5, 2, 0)


def test_json_lines_with_one_value(tmp_path):
    lines = [json.dumps({"timestamp": f"2007-04-01T00:0{i}:00", "value": i}) for i in range(3)]
    path = write(tmp_path / "d.txt", *lines)
    series = read_series(path, ["Global_active_power"])
    assert series.values[:, 0].tolist() == [0, 1, 2] and series.sensors == (DEFAULT_SENSOR,)


@pytest.mark.parametrize("line, reason", [
    ('{"timestamp": "2007-04-01T00:05:00", "values": {"a": "x"}}', "a must be a number"),
    ('{"timestamp": "2007-04-01T00:05:00", "values": {"a": 1e39}}', "out of range"),
    ('{"values": {"a": 1}}', "no timestamp: offline readings need one"),
    ('{"timestamp": "April", "values": {"a": 1}}', "bad timestamp"),
    ('{"timestamp": "2007-04-01T00:05:00", "values": {"a": 1}', "bad JSON"),
    ('{"timestamp": "2007-04-01T00:05:00", "values": {"a": 1}, "sensor": 7}', '"sensor" must be a string'),
])
def test_an_invalid_json_line_is_named_by_its_number(tmp_path, line, reason):
    path = write(tmp_path / "d.jsonl", '{"timestamp": "2007-04-01T00:00:00", "values": {"a": 1}}', "", line)
    with pytest.raises(RecordError, match=rf"d\.jsonl:3: .*{reason}.*on_error: skip"):
        read_series(path, ["a"])
    series = read_series(path, ["a"], on_error="skip")
    assert (len(series), series.malformed) == (1, 1) and series.errors[0].startswith(f"{path}:3: ")


@pytest.mark.parametrize("kind", ["gz", "zip"])
def test_compressed_csv(tmp_path, kind):
    text = "time,v\n" + "".join(f"{T0 + 60 * i},{i}\n" for i in range(5))
    path = tmp_path / f"d.{kind}"
    if kind == "gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("__MACOSX/._readings.csv", b"\x00\x05\x16\x07")  # the Finder's resource fork comes first
            z.writestr("readings.csv", text)
    series = read_series(path, ["v"])
    assert series.values[:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("json_lines, n, kept", [(False, 9, 4), (True, 10, 5)])  # a header or a blank line is no data
def test_ratio_keeps_the_first_fraction_of_data_lines(tmp_path, json_lines, n, kept):
    if json_lines:
        lines = [json.dumps({"timestamp": f"2007-04-01T00:{i:02}:00", "value": i}) for i in range(n)]
    else:
        lines = ["time,v", *[f"{T0 + 60 * i},{i}" for i in range(n)]]
    path = write(tmp_path / "d", *lines[:3], "", *lines[3:])
    series = read_series(path, ["v"], ratio=0.5)
    assert series.lines == kept and series.values[:, 0].tolist() == list(range(kept))


def test_the_uci_sample_reads_as_read_uci_reads_it():
    series, uci = read_series(SAMPLE_PATH, UCI_COLUMNS), read_uci(SAMPLE_PATH, UCI_COLUMNS)
    np.testing.assert_array_equal(series.timestamps, uci.timestamps)
    np.testing.assert_array_equal(series.values, uci.values)
    assert (series.lines, series.missing, series.segments) == (uci.lines, uci.missing, uci.segments)
    assert series.sensors == uci.sensors == (DEFAULT_SENSOR,)


def test_a_headerless_uci_file_is_told_by_its_first_line(tmp_path):
    path = write(tmp_path / "d.csv", "", "16/12/2006;17:24:00;4.216;0.418;234.840;18.400;0.000;1.000;17.000")
    assert read_series(path, ["Voltage"]).values.tolist() == [[pytest.approx(234.84)]]


def test_an_empty_result_is_a_series_without_rows(tmp_path):
    path = write(tmp_path / "d.csv", "sensor,time,v", f"a,{T0},?")
    series = read_series(path, ["v"])
    assert (len(series), series.values.shape, series.missing) == (0, (0, 1), 1)
    assert (series.sensors, series.segments) == ((), (0,))


def test_select_keeps_sensor_names_with_their_segments():
    series = Series(("x",), np.arange(9, dtype=np.int64), np.arange(9, dtype=np.float32).reshape(-1, 1), "t", 9, 0, 0,
                    segments=(0, 3, 5), sensors=("a", "b", "c"))
    kept = series.select(~np.isin(np.arange(9), [3, 4, 6]))  # all of b's rows go
    assert (kept.segments, kept.sensors) == ((0, 3), ("a", "c"))
    assert kept.values[:, 0].tolist() == [0, 1, 2, 5, 7, 8]
    first_gone = series.select(np.arange(9) >= 3)
    assert (first_gone.segments, first_gone.sensors) == ((0, 2), ("b", "c"))
    assert series.select(np.zeros(9, bool)).sensors == ()


def test_the_summary_spans_every_sensor_whatever_their_order(tmp_path):
    path = write(tmp_path / "two.csv", "timestamp,sensor,x", "2020-01-01T00:00:00,a,1", "2020-01-01T00:01:00,a,2",
                 "2019-06-01T00:00:00,b,3", "2019-06-01T00:01:00,b,4")
    summary = read_series(path, ["x"]).summary()
    assert (summary["first"], summary["last"]) == ("2019-06-01T00:00:00", "2020-01-01T00:01:00")


def test_a_csv_field_over_the_csv_modules_size_limit_is_a_malformed_line_not_a_crash(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("time,x\n2007-01-01T00:00:00,1\n2007-01-01T00:01:00," + "9" * 200_000 + "\n2007-01-01T00:02:00,3\n")
    with pytest.raises(RecordError, match="huge.csv:3: unreadable CSV"):
        read_series(path, ["x"])
    series = read_series(path, ["x"], on_error="skip")
    assert series.values[:, 0].tolist() == [1.0, 3.0] and series.malformed == 1
