"""Statistics for comparing strategies: intervals over seeds, paired tests over examples.

Pure Python plus numpy (already a dependency of torch); no scipy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("t quantile needs at least 1 degree of freedom (2 seeds)")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)  # Cornish-Fisher: within 1e-3 of the exact value beyond 30


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% t interval of the mean, as computed (not clipped to the
    values' range).

    `std` is None with one value. `ci95` is None with fewer than two distinct values: equal values (two seeds
    that both scored 56.25%) have std 0, and the zero-width interval that would give claims a certainty that
    the sample cannot support; no interval exists.
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if len(set(values)) < 2:
        return {"mean": mean, "std": std, "ci95": None}
    half = t95(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test on paired outcomes: two-sided binomial test of the discordant pairs.

    `a_only`: rows A gets right and B wrong; `b_only`: the reverse.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError("paired test needs the same rows for both strategies")
    a_only = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    b_only = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Accuracy difference A - B with a 95% percentile interval from resampling examples.

    `a`, `b`: (seeds, examples) 0/1 correctness on the same examples. Each resample draws examples with
    replacement and keeps all seeds of a drawn example together, so the interval reflects which
    questions happened to be in the evaluation set; the spread over seeds is reported separately.
    `p`: two-sided bootstrap p-value of "no difference" (twice the smaller tail mass at 0).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    diff = a.astype(np.float64).mean(0) - b.astype(np.float64).mean(0)  # per example, averaged over seeds
    rng = np.random.default_rng(seed)
    n = diff.shape[0]
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory flat for large evaluation sets
        stop = min(resamples, start + 1000)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return {"diff": float(diff.mean()), "ci95": [float(lo), float(hi)], "p": p}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
