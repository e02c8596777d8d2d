"""The harness's statistics on known data (the method is documented in agentkernel/bench/stats.py and
docs/benchmark-method.md: linear interpolation between closest ranks, numpy's default)."""

from __future__ import annotations

import math
import random

import pytest

from agentkernel.bench import stats

ONE_TO_TEN = [float(x) for x in range(1, 11)]


@pytest.mark.parametrize(("p", "want"), [(0, 1.0), (10, 1.9), (25, 3.25), (50, 5.5), (75, 7.75), (90, 9.1),
                                         (95, 9.55), (99, 9.91), (100, 10.0)])
def test_percentile_linear_interpolation_on_1_to_10(p, want):
    assert stats.percentile(ONE_TO_TEN, p) == pytest.approx(want)


def test_percentile_ignores_input_order_and_handles_small_samples():
    shuffled = ONE_TO_TEN[:]
    random.Random(7).shuffle(shuffled)
    assert stats.percentile(shuffled, 50) == 5.5
    assert stats.percentile([42.0], 0) == stats.percentile([42.0], 99) == 42.0
    assert stats.percentile([10.0, 20.0], 25) == 12.5
    assert stats.percentile([10.0, 20.0], 50) == 15.0
    assert stats.median([3.0, 1.0, 2.0]) == 2.0


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_reference_method_for_comparison():
    # the reference's idx = p * n / 100 on the sorted list: with 10 samples p95 and p99 are both the max
    assert stats.percentile_reference(ONE_TO_TEN, 50) == 6.0
    assert stats.percentile_reference(ONE_TO_TEN, 95) == 10.0
    assert stats.percentile_reference(ONE_TO_TEN, 99) == 10.0
    assert stats.percentile(ONE_TO_TEN, 95) < stats.percentile_reference(ONE_TO_TEN, 95)


def test_matches_numpy_default_on_random_data():
    np = pytest.importorskip("numpy")
    rng = random.Random(1234)
    for n in (1, 2, 3, 7, 100, 1001):
        xs = [rng.lognormvariate(3, 0.8) for _ in range(n)]
        for p in (0, 1, 5, 50, 90, 95, 99, 99.9, 100):
            assert stats.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), rel=1e-12)


def test_mean_stdev_and_summary():
    xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    assert stats.mean(xs) == 5.0
    assert stats.stdev(xs) == pytest.approx(math.sqrt(32 / 7))  # sample stdev (n - 1)
    assert stats.stdev([1.0]) == 0.0
    s = stats.summarize(ONE_TO_TEN)
    assert list(s) == list(stats.SUMMARY_FIELDS)
    assert s["n"] == 10 and s["min_ms"] == 1.0 and s["max_ms"] == 10.0 and s["mean_ms"] == 5.5
    assert s["p50_ms"] == 5.5 and s["p90_ms"] == 9.1 and s["p95_ms"] == 9.55 and s["p99_ms"] == 9.91
    empty = stats.summarize([])
    assert empty["n"] == 0 and empty["p50_ms"] is None


def test_ratio_throughput_success():
    assert stats.ratio(50.0, 200.0) == 0.25
    assert stats.ratio(None, 1.0) is None and stats.ratio(1.0, 0.0) is None
    assert stats.per_second(100, 8400.0) == pytest.approx(11.905, abs=1e-3)
    assert stats.per_second(1, 0) is None
    assert stats.success_rate(95, 100) == 0.95
    assert stats.success_rate(0, 0) is None
