"""Latency figures (issue 16): median and spread over repeats, threads and batch stated, unsteady flagged."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcomp.evaluation.cost import UNSTEADY_RATIO, latency_ms, latency_stats, measure_latency


def _fake_timer(durations_s):
    """A timer whose successive (start, stop) readings are ``durations_s`` apart."""
    readings = itertools.accumulate(d for dur in durations_s for d in (1.0, dur))
    return lambda: next(readings)


def test_fake_timer_steady_and_unsteady():
    net = torch.nn.Linear(4, 2)
    steady = measure_latency(net, (4,), 8, warmup=2, reps=5, timer=_fake_timer([0.010, 0.011, 0.010, 0.012, 0.010]))
    assert steady["median_ms"] == pytest.approx(10.0) and steady["min_ms"] == pytest.approx(10.0)
    assert steady["max_ms"] == pytest.approx(12.0) and steady["steady"] is True
    assert steady["batch"] == 8 and steady["threads"] == torch.get_num_threads() and steady["warmup"] == 2
    assert "batch 8" in steady["note"] and "thread" in steady["note"] and "UNSTEADY" not in steady["note"]
    busy = measure_latency(net, (4,), 1, reps=4, timer=_fake_timer([0.010, 0.100, 0.011, 0.012]))
    assert busy["steady"] is False and busy["max_over_min"] == pytest.approx(10.0)
    assert "UNSTEADY" in busy["note"] and "do not trust" in busy["note"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=30))
def test_stats_are_ordered(times):
    s = latency_stats(times, batch=1, threads=1, warmup=0)
    assert s["min_ms"] <= s["q1_ms"] <= s["median_ms"] <= s["q3_ms"] <= s["max_ms"]
    assert s["iqr_ms"] == pytest.approx(s["q3_ms"] - s["q1_ms"])
    assert s["steady"] == (max(times) / min(times) <= UNSTEADY_RATIO)
    assert s["reps"] == len(times)


def test_latency_ms_keeps_returning_the_median_of_a_real_model():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 8, 8))
    v = latency_ms(net, (1, 8, 8), 2, warmup=1, reps=3)
    assert isinstance(v, float) and v > 0
    with pytest.raises(ValueError):
        measure_latency(net, (1, 8, 8), 2, reps=0)
