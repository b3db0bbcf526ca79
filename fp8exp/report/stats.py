"""The statistics behind a verdict: a mean difference with a t-based 95% confidence interval,
paired by seed where both sides ran the same seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Delta:
    """Mean difference (configuration - baseline) with a t-based 95% confidence interval."""

    mean: float
    low: float | None
    high: float | None
    n: int
    paired: bool

    @property
    def verdict(self) -> str:
        if self.low is None:
            return "one seed: no CI"
        if self.high < 0:
            return "LOST accuracy"
        if self.low > 0:
            return "gained accuracy"
        return "no clear accuracy change"


def delta_ci(values: dict[str, float], baseline: dict[str, float], confidence: float = 0.95) -> Delta:
    """`values` and `baseline` map seed -> metric. Seeds present in both are paired (the same
    data order and initialisation, so seed-to-seed noise cancels); otherwise Welch's interval."""
    from scipy import stats

    common = sorted(set(values) & set(baseline))
    if len(common) >= 2:
        diffs = np.array([values[s] - baseline[s] for s in common])
        half = stats.t.ppf((1 + confidence) / 2, len(diffs) - 1) * diffs.std(ddof=1) / math.sqrt(len(diffs))
        return Delta(float(diffs.mean()), float(diffs.mean() - half), float(diffs.mean() + half), len(diffs), True)
    a, b = np.array(list(values.values())), np.array(list(baseline.values()))
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Delta(mean, None, None, min(len(a), len(b)), False)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Delta(mean, mean, mean, min(len(a), len(b)), False)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, dof) * math.sqrt(va + vb)
    return Delta(mean, mean - half, mean + half, min(len(a), len(b)), False)
