"""Win-rate arithmetic and intervals on hand-made verdicts."""

import math

import pytest

from tsalign.stats import mean_interval, outcome, win_rate


def test_outcome_with_tie_threshold():
    assert outcome(0.3) == 1.0
    assert outcome(-0.3) == 0.0
    assert outcome(0.0) == 0.5
    assert outcome(0.05, tie_threshold=0.1) == 0.5
    assert outcome(-0.05, tie_threshold=0.1) == 0.5
    assert outcome(0.2, tie_threshold=0.1) == 1.0


def test_win_rate_counts_ties_half_and_interval_by_hand():
    r = win_rate([1.0, 1.0, 0.5, 0.0])
    assert (r["win"], r["tie"], r["loss"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == pytest.approx(0.625)
    # Wilson, z = 1.959964, n = 4, p = 0.625: center = (p + z^2/8) / (1 + z^2/4) = 0.563766,
    # half = z * sqrt(p(1-p)/4 + z^2/64) / (1 + z^2/4) = 0.344337
    assert r["ci_low"] == pytest.approx(0.219429, abs=1e-5)
    assert r["ci_high"] == pytest.approx(0.908103, abs=1e-5)


def test_all_ties_is_half_and_the_interval_keeps_its_width():
    r = win_rate([0.5] * 10)
    assert r["win_rate"] == 0.5 and r["ci_low"] < 0.5 < r["ci_high"]
    assert r["ci_high"] - 0.5 == pytest.approx(0.5 - r["ci_low"])


def test_all_wins_interval_is_not_a_point():
    r = win_rate([1.0] * 8)
    assert r["win_rate"] == 1.0 and r["ci_high"] == 1.0 and 0.5 < r["ci_low"] < 1.0


def test_confidence_widens_the_interval():
    narrow, wide = win_rate([1.0, 0.0, 1.0] * 10, 0.8), win_rate([1.0, 0.0, 1.0] * 10, 0.99)
    assert wide["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < wide["ci_high"]


def test_interval_shrinks_with_n():
    small = win_rate([1.0, 0.0] * 8)
    large = win_rate([1.0, 0.0] * 128)
    assert small["win_rate"] == large["win_rate"] == 0.5
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 3


def test_mean_interval_edge_cases():
    m, lo, hi = mean_interval([])
    assert math.isnan(m)
    m, lo, hi = mean_interval([2.0])
    assert m == 2.0 and lo == -math.inf and hi == math.inf
    m, lo, hi = mean_interval([1.0, 3.0], confidence=0.9)
    assert m == 2.0 and lo < 2.0 < hi
