"""Uncertainty of per-image figures: bootstrap confidence intervals of a mean, paired comparisons
of two runs on the same images, and Holm's adjustment over several comparisons.

The bootstrap and the signed-rank test are scipy's (`stats.bootstrap`, BCa, its default method;
`stats.wilcoxon`, two-sided, zeros dropped as in Wilcoxon's original test): nothing is re-derived
here. Every bootstrap draws a fixed number of resamples from a generator seeded afresh, so the
same figures give the same interval on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `resamples` resamples, generator seeded with `seed`, at `level`."""

    resamples: int = 10_000
    seed: int = 0
    level: float = 0.95


DEFAULT = Bootstrap()


def mean_ci(values, settings: Bootstrap = DEFAULT) -> tuple[float, float]:
    """The bootstrap confidence interval of the mean of `values` (at least two, no NaN).

    When every value is the same, every resample has that mean: the interval is that value
    (scipy's BCa interval is undefined there: it returns NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.isnan(values).any():
        raise ValueError(f"a bootstrap interval needs two or more values without NaN, got {values!r}")
    if (values == values[0]).all():
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=settings.resamples, confidence_level=settings.level,
                             vectorized=True, rng=np.random.default_rng(settings.seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Comparison:
    """A run against a baseline on the images both evaluated (delta = run - baseline)."""

    n_paired: int
    delta: float  # mean difference
    ci_low: float
    ci_high: float
    p_wilcoxon: float
    n_better: int
    n_worse: int
    n_tied: int


def compare_paired(values, baseline, settings: Bootstrap = DEFAULT) -> Comparison:
    """`values` against `baseline`, image by image (same order, same length, at least two): the
    mean difference with the bootstrap interval of the differences' mean, the Wilcoxon
    signed-rank p-value, and how many images are better, worse or tied."""
    values, baseline = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if values.shape != baseline.shape:
        raise ValueError(f"paired figures of different lengths: {len(values)} and {len(baseline)}")
    difference = values - baseline
    low, high = mean_ci(difference, settings)
    # Every pair tied: no image tells the runs apart, p = 1 (scipy's exact test says so below 51
    # pairs; its normal approximation above divides 0 by 0).
    p = float(stats.wilcoxon(values, baseline).pvalue) if difference.any() else 1.0
    return Comparison(n_paired=len(difference), delta=float(difference.mean()), ci_low=low, ci_high=high,
                      p_wilcoxon=p, n_better=int((difference > 0).sum()), n_worse=int((difference < 0).sum()),
                      n_tied=int((difference == 0).sum()))


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of m p-values (the family-wise error over all of them): the
    k-th smallest becomes max over j <= k of min(1, (m - j + 1) p_(j)); returned in the given order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    steps = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted.tolist()
