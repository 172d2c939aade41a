"""Win rates and intervals for evaluation (unit-tested on hand-made verdicts)."""

from __future__ import annotations

import math
import statistics


def describe(values: list[float]) -> dict:
    """mean, std, min, max of a list (empty dict for no values)."""
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def longer_wins_rate(preferred_lengths: list[float], other_lengths: list[float]) -> float:
    """The 'longer answer wins' baseline: how often the preferred answer of a pair is the longer one;
    equal lengths count half. Beside a judge's or reward model's accuracy it shows how much of it
    length alone explains."""
    if not preferred_lengths:
        return math.nan
    hits = sum(1.0 if p > o else 0.5 if p == o else 0.0 for p, o in zip(preferred_lengths, other_lengths))
    return hits / len(preferred_lengths)


def outcome(delta: float, tie_threshold: float = 0.0) -> float:
    """1 win, 0.5 tie, 0 loss for a score difference (policy - base)."""
    return 1.0 if delta > tie_threshold else 0.0 if delta < -tie_threshold else 0.5


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its normal-approximation interval (the CLT; n >= ~30 for it to mean much)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n == 1:
        return mean, -math.inf, math.inf
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(p: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: stays inside [0, 1] and keeps a width at p = 0 or 1 or with small n,
    where the normal interval collapses to a point."""
    if n == 0:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def win_rate(outcomes: list[float], confidence: float = 0.95) -> dict:
    """Win / tie / loss counts and the win rate (ties count half) with its Wilson interval."""
    rate = statistics.fmean(outcomes) if outcomes else math.nan
    low, high = wilson_interval(rate, len(outcomes), confidence)
    return {"n": len(outcomes), "win": sum(o == 1.0 for o in outcomes), "tie": sum(o == 0.5 for o in outcomes),
            "loss": sum(o == 0.0 for o in outcomes), "win_rate": rate, "ci_low": low, "ci_high": high,
            "confidence": confidence}
