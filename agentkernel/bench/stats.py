"""Statistics for the benchmark harness. Standard library only.

Percentiles use **linear interpolation between closest ranks** (Hyndman & Fan type 7, the default of
numpy ``percentile``, R ``quantile`` and Excel ``PERCENTILE.INC``)::

    xs sorted ascending, n = len(xs), h = (n - 1) * p / 100
    P(p) = xs[floor(h)] + (h - floor(h)) * (xs[floor(h) + 1] - xs[floor(h)])

so P(0) is the minimum, P(100) the maximum and P(50) the usual median (the mean of the two middle
values for even n). The reference suite indexed ``xs[p * n / 100]`` (a nearest-rank variant that
over-states high percentiles of small samples: with 10 samples its p95 and p99 are both the maximum);
``percentile_reference`` reproduces that method so the two can be compared on the same data.

Every duration is in milliseconds. ``summarize`` is the one aggregate every measurement carries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PERCENTILE_METHOD = "linear interpolation between closest ranks (Hyndman-Fan type 7, numpy default)"
SUMMARY_FIELDS = ("n", "min_ms", "max_ms", "mean_ms", "stdev_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms")


def percentile(samples: Iterable[float], p: float) -> float:
    """The p-th percentile (0 <= p <= 100) by linear interpolation (type 7). Raises on no data."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def percentile_reference(samples: Iterable[float], p: float) -> float:
    """The reference suite's method: ``sorted[min(n - 1, int(p * n / 100))]`` (for comparison only)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("percentile of no samples")
    return xs[min(len(xs) - 1, int(p * len(xs) / 100))]


def median(samples: Iterable[float]) -> float:
    return percentile(samples, 50)


def mean(samples: Sequence[float]) -> float:
    if not samples:
        raise ValueError("mean of no samples")
    return math.fsum(samples) / len(samples)


def stdev(samples: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0.0 for fewer than two samples."""
    n = len(samples)
    if n < 2:
        return 0.0
    m = mean(samples)
    return math.sqrt(math.fsum((x - m) ** 2 for x in samples) / (n - 1))


def _r(x: float) -> float:
    return round(x, 6)


def summarize(samples: Sequence[float]) -> dict:
    """n, min, max, mean, stdev, p50/p90/p95/p99 of millisecond samples (all fields None when empty)."""
    xs = [float(x) for x in samples]
    if not xs:
        return {k: (0 if k == "n" else None) for k in SUMMARY_FIELDS}
    return {
        "n": len(xs),
        "min_ms": _r(min(xs)),
        "max_ms": _r(max(xs)),
        "mean_ms": _r(mean(xs)),
        "stdev_ms": _r(stdev(xs)),
        "p50_ms": _r(percentile(xs, 50)),
        "p90_ms": _r(percentile(xs, 90)),
        "p95_ms": _r(percentile(xs, 95)),
        "p99_ms": _r(percentile(xs, 99)),
    }


def ratio(ours: float | None, raw: float | None) -> float | None:
    """ours / raw (both medians); None when either is missing or raw is zero. < 1 means we are faster."""
    if ours is None or raw is None or raw <= 0:
        return None
    return round(ours / raw, 4)


def per_second(count: int, wall_ms: float | None) -> float | None:
    """Throughput: ``count`` operations in ``wall_ms`` milliseconds -> operations per second."""
    if not wall_ms or wall_ms <= 0:
        return None
    return round(count / (wall_ms / 1000.0), 3)


def success_rate(ok: int, total: int) -> float | None:
    """Fraction in [0, 1] (None for no attempts)."""
    if total <= 0:
        return None
    return round(ok / total, 4)
