"""The daemon's own metric types, read back through prometheus_client's exposition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from stream_forecaster.metrics import BulkHistogram

BUCKETS = (0.01, 0.1, 1, 2.5, 10)


def exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition's lines, less the ``_created`` ones only prometheus_client's types write and the sums
    (numpy adds in another order: compared apart)."""
    return [line for line in generate_latest(registry).decode().splitlines() if not ("_created" in line
                                                                                      or "_sum{" in line)]


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from(BUCKETS) | st.floats(0, 20), max_size=30), max_size=5))
def test_a_bulk_histogram_exposes_what_a_histogram_observing_each_value_exposes(batches):
    bulk_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("t_error", "help", BUCKETS, ["target"], registry=bulk_registry)
    plain = Histogram("t_error", "help", ["target"], buckets=BUCKETS, registry=plain_registry)
    for target in ("a", "b"):
        bulk_series, plain_series = bulk.labels(target), plain.labels(target)
        for values in batches:
            bulk_series.observe_many(np.array(values))
            for v in values:
                plain_series.observe(v)
    assert exposed(bulk_registry) == exposed(plain_registry)
    for target in ("a", "b"):
        assert bulk_registry.get_sample_value("t_error_sum", {"target": target}) == pytest.approx(
            plain_registry.get_sample_value("t_error_sum", {"target": target}))


def test_a_bulk_histogram_reads_back_by_sample_name():
    registry = CollectorRegistry()
    latency = BulkHistogram("t_latency_seconds", "help", BUCKETS, registry=registry).labels()
    latency.observe_many([0.01, 0.5, 30.0])
    latency.observe(1.0)
    assert registry.get_sample_value("t_latency_seconds_count") == 4
    assert registry.get_sample_value("t_latency_seconds_sum") == pytest.approx(31.51)
    assert registry.get_sample_value("t_latency_seconds_bucket", {"le": "0.01"}) == 1  # a bound is inside its bucket
    assert registry.get_sample_value("t_latency_seconds_bucket", {"le": "1.0"}) == 3
    assert registry.get_sample_value("t_latency_seconds_bucket", {"le": "+Inf"}) == 4


def test_a_bulk_histogram_refuses_the_wrong_labels():
    histogram = BulkHistogram("t_error", "help", BUCKETS, ["target"])
    with pytest.raises(ValueError, match="target"):
        histogram.labels()
