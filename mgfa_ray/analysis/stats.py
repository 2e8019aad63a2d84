"""The statistics every published comparison uses: a mean with its 95% t confidence interval over
seeds, a paired difference over seeds with its interval and paired t-test (scipy.stats), and the
Wilson interval of one top-1 accuracy on a test set of known size.
"""

from __future__ import annotations

import math

import numpy as np


def ci95(values) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1) and the 95% t confidence interval of ``values``.

    Returns:
        ``{"n", "mean", "sd", "ci_low", "ci_high"}``; sd and the interval are NaN for n < 2
        (and the interval is the mean when sd is 0).
    """
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def paired_difference(a, b) -> dict[str, float]:
    """Paired comparison of ``a`` against ``b`` (same seeds, same order): mean of a - b with its 95% t
    interval, and the two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``).

    Returns:
        ``{"n", "diff_mean", "diff_ci_low", "diff_ci_high", "p_value"}``; NaN where n < 2 (and p
        when every difference is equal).

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {len(a)} and {len(b)}")
    d = ci95(a - b)
    p = math.nan
    if d["n"] >= 2 and d["sd"] > 0:
        p = float(stats.ttest_rel(a, b).pvalue)
    return {"n": d["n"], "diff_mean": d["mean"], "diff_ci_low": d["ci_low"], "diff_ci_high": d["ci_high"],
            "p_value": p}


def test_set_interval(top1: float, n_test: int | None) -> tuple[float, float]:
    """The 95% Wilson interval of an accuracy ``top1`` measured on ``n_test`` test images
    (``scipy.stats.binomtest``): the uncertainty from the finite test set, beside the seeds' t
    interval. NaN without a count."""
    from scipy import stats

    if not n_test or math.isnan(top1):
        return math.nan, math.nan
    ci = stats.binomtest(round(top1 * n_test), n_test).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)
