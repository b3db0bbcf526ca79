"""The statistics behind a verdict: a mean difference with a t-based 95% confidence interval,
paired by seed where both sides ran the same seeds.

Rules for a verdict (gained / LOST / no clear change): it needs at least MIN_SEEDS seeds (pairs,
or seeds on each side when unpaired); from fewer the interval is still reported. When every seed
gives the same difference there is no spread to build a t interval from, so none is given: the
difference is called exact only when it is zero ("identical on every seed"). `mean_ci` is the
interval alone, for per-seed values paired already (parity.py: relative loss errors)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SEEDS = 3
"""From two seeds a t interval rests on one degree of freedom: too easily narrow by chance."""
SAME = 1e-9
"""Accuracies closer than this are equal: on a real test set they differ by at least one example
(1/size), far above the rounding in logged values."""


def seed_order(seed: str) -> tuple:
    """Seeds in numeric order where they are numbers (2 before 10)."""
    return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)


@dataclass
class Delta:
    """Mean difference (configuration - baseline) with a t-based 95% confidence interval."""

    mean: float
    low: float | None
    high: float | None
    n: int
    """Pairs when paired; else this configuration's seeds."""
    paired: bool
    n_baseline: int = 0
    """Pairs when paired; else the baseline's seeds."""
    constant: bool = False
    """Every seed gave the same difference: no spread, so no interval."""
    common: tuple[str, ...] = ()
    """Seeds both sides ran: the pairs when paired."""
    only_here: tuple[str, ...] = ()
    """Seeds this configuration ran and the baseline did not (left out of a pairing)."""
    only_baseline: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        if self.constant:
            return "identical on every seed" if abs(self.mean) <= SAME else "no variance across seeds: CI undefined"
        if self.low is None:
            return "one seed: no CI"
        if min(self.n, self.n_baseline) < MIN_SEEDS:
            return f"too few seeds to decide (n={min(self.n, self.n_baseline)})"
        if self.high < 0:
            return "LOST accuracy"
        if self.low > 0:
            return "gained accuracy"
        return "no clear accuracy change"


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the mean of `values` (per-seed differences, paired) with a t-based
    interval on len(values) - 1 degrees of freedom; (mean, None, None) from one value, or when
    the values do not vary (within SAME) and there is no spread to build an interval from."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean, n = float(values.mean()), len(values)
    if n < 2 or np.ptp(values) <= SAME:
        return mean, None, None
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def delta_ci(values: dict[str, float], baseline: dict[str, float], confidence: float = 0.95) -> Delta:
    """`values` and `baseline` map seed -> metric. Seeds present in both are paired (the same
    data order and initialisation, so seed-to-seed noise cancels) when there are two or more,
    the others left out; otherwise Welch's interval over every seed."""
    from scipy import stats

    seeds = {"common": tuple(sorted(set(values) & set(baseline), key=seed_order)),
             "only_here": tuple(sorted(set(values) - set(baseline), key=seed_order)),
             "only_baseline": tuple(sorted(set(baseline) - set(values), key=seed_order))}
    if len(seeds["common"]) >= 2:
        diffs = [values[s] - baseline[s] for s in seeds["common"]]
        mean, low, high = mean_ci(diffs, confidence)
        return Delta(mean, low, high, len(diffs), True, len(diffs), constant=low is None, **seeds)
    a, b = np.array(list(values.values())), np.array(list(baseline.values()))
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Delta(mean, None, None, len(a), False, len(b), **seeds)
    if np.ptp(a) <= SAME and np.ptp(b) <= SAME:
        return Delta(mean, None, None, len(a), False, len(b), constant=True, **seeds)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, dof) * math.sqrt(va + vb)
    return Delta(mean, mean - half, mean + half, len(a), False, len(b), **seeds)
