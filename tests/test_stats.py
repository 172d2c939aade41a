"""Win-rate arithmetic and intervals on hand-made verdicts."""

import math

import pytest

from tsalign.algorithms.stats import auc, auc_change, mean_interval, outcome, win_rate


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


# ---------------------------------------------------------------- paired bootstrap, length control, control checks

from tsalign.algorithms.stats import (  # noqa: E402
    bootstrap_interval,
    control_checks,
    fit_logistic,
    length_controlled_win_rate,
    paired_win_rate,
    sign_test,
)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5] * 4
    low, high = bootstrap_interval(values, seed=3)
    assert (low, high) == bootstrap_interval(values, seed=3)  # reproducible
    assert low < sum(values) / len(values) < high
    assert bootstrap_interval([0.7] * 20) == (0.7, 0.7)  # no spread, no width
    wide = bootstrap_interval(values, confidence=0.99, seed=3)
    assert wide[0] <= low and high <= wide[1]


def test_bootstrap_keeps_pairs_together_for_a_statistic():
    rows = [(1.0, 0.0)] * 10 + [(0.0, 1.0)] * 10
    low, high = bootstrap_interval(rows, lambda rs: sum(a - b for a, b in rs) / len(rs), seed=0)
    assert low < 0 < high and -1 <= low and high <= 1


def test_paired_win_rate_counts_ties_half():
    r = paired_win_rate([1.0, 1.0, 0.5, 0.0], seed=0)
    assert (r["win"], r["tie"], r["loss"], r["n"]) == (2, 1, 1, 4) and r["win_rate"] == pytest.approx(0.625)
    assert 0.0 <= r["ci_low"] <= 0.625 <= r["ci_high"] <= 1.0


def test_logistic_fit_by_hand():
    # y = 1 exactly where x > 0: the slope is large and positive, the intercept near 0
    x = [-1.0, -0.5, 0.5, 1.0] * 5
    a, b = fit_logistic(x, [0.0, 0.0, 1.0, 1.0] * 5)
    assert b > 3 and abs(a) < 1e-6
    # no relation to x: slope 0, intercept logit(0.75)
    a, b = fit_logistic([-1.0, 1.0] * 8, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0] * 2)
    assert abs(b) < 1e-6 and a == pytest.approx(math.log(3), abs=1e-3)


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # the judge only sees length: the longer answer wins 9 times in 10, whoever wrote it; the policy
    # is longer (by 40 characters) in 30 of 40 pairs and shorter (by 40) in 10
    longer = [1.0] * 27 + [0.0] * 3
    shorter = [1.0] * 1 + [0.0] * 9
    outcomes = longer + shorter
    len_policy, len_base = [140] * 30 + [60] * 10, [100] * 40
    lc = length_controlled_win_rate(outcomes, len_policy, len_base, seed=0)
    assert sum(outcomes) / len(outcomes) == 0.7
    assert lc["length_coef"] > 1
    assert lc["lc_win_rate"] == pytest.approx(0.5, abs=0.01)  # at equal length, a coin flip
    assert lc["lc_ci_low"] < 0.5 < lc["lc_ci_high"]  # no evidence of a better policy once length is out
    assert paired_win_rate(outcomes, seed=0)["ci_low"] > 0.5  # the raw win rate would claim one


def test_length_controlled_equals_raw_without_length_differences():
    outcomes = [1.0, 1.0, 0.0, 1.0] * 8
    lc = length_controlled_win_rate(outcomes, [50] * 32, [50] * 32, seed=0)
    assert lc["lc_win_rate"] == pytest.approx(0.75, abs=1e-3)


def _control(judge: str, n: int = 64):
    """Outcomes of pi_0 vs pi_0 pairs (arm a vs arm b) under a judge that has one bias and nothing else."""
    import random

    rng = random.Random(0)
    len_a = [rng.randint(20, 200) for _ in range(n)]
    len_b = [rng.randint(20, 200) for _ in range(n)]
    if judge == "longer":
        outcomes = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(len_a, len_b)]
        return outcomes, len_a, len_b, None, None
    if judge == "first_slot":  # both orders asked: each single-order verdict picks slot 1, averaged -> tie
        return [0.5] * n, len_a, len_b, 2 * n, 2 * n
    outcomes = [float(i % 2) for i in range(n)]  # fair: verdicts unrelated to slot and length
    return outcomes, len_a, len_b, n, 2 * n


def test_control_passes_for_a_fair_judge():
    result = control_checks(*_control("fair"))
    assert result["passed"], result


def test_control_fails_for_a_judge_that_prefers_the_longer_answer():
    result = control_checks(*_control("longer"))
    assert not result["passed"]
    assert result["checks"]["length"]["value"] == 1.0 and not result["checks"]["length"]["passed"]
    assert result["checks"]["win_rate"]["passed"]  # the win rate alone would not have shown it


def test_control_fails_for_a_judge_that_prefers_the_first_slot():
    result = control_checks(*_control("first_slot"))
    assert not result["passed"]
    assert result["checks"]["position"]["value"] == 1.0 and not result["checks"]["position"]["passed"]
    assert result["checks"]["win_rate"]["passed"]  # averaging both orders hides it in the win rate


def test_sign_test_by_hand():
    assert sign_test(0, 0) == 1.0 and sign_test(2, 4) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32)  # both all-heads and all-tails count
    assert sign_test(1, 5) == sign_test(4, 5) == pytest.approx(2 * 6 / 32)
    assert sign_test(9, 32) == pytest.approx(0.0201, abs=1e-4)


def test_control_fails_an_unbiased_judge_in_at_most_one_run_in_twenty():
    """Exchangeable arms (pi_0 vs pi_0), an unbiased judge with ties, a pairwise judge's single-order picks: the
    control's three checks together fail at most 5% of runs at 95% (three separate 95% intervals would fail ~10%)."""
    import random

    rng, runs, failed = random.Random(1), 2000, 0
    for _ in range(runs):
        n = 32
        outcomes = [rng.choice([0.0, 0.5, 1.0, 1.0, 0.0]) for _ in range(n)]
        len_a, len_b = [rng.randint(20, 60) for _ in range(n)], [rng.randint(20, 60) for _ in range(n)]
        picks = sum(rng.random() < 0.5 for _ in range(2 * n))
        failed += not control_checks(outcomes, len_a, len_b, picks, 2 * n)["passed"]
    assert failed / runs <= 0.05 + 3 * (0.05 * 0.95 / runs) ** 0.5, failed / runs


def test_auc_by_hand_with_ties():
    # positives 3, 1; negatives 2, 1: pairs (3>2) (3>1) (1<2) (1=1) -> (1 + 1 + 0 + 0.5) / 4
    assert auc([3.0, 2.0, 1.0, 1.0], [True, False, True, False]) == pytest.approx(0.625)
    assert auc([1.0, 2.0, 3.0], [False, True, True]) == 1.0 and auc([1.0, 2.0, 3.0], [True, False, False]) == 0.0
    assert auc([5.0] * 4, [True, False, True, False]) == 0.5
    assert math.isnan(auc([1.0, 2.0], [True, True]))  # no negatives: undefined, not 0 or 1


def test_auc_change_is_paired_seeded_and_brackets_the_change():
    labels = [i % 2 == 0 for i in range(40)]
    before = [float(i % 7) for i in range(40)]  # unrelated to the label
    after = [b + (3.0 if y else 0.0) for b, y in zip(before, labels)]  # the same rows, now the label shows
    r = auc_change(before, after, labels, seed=1)
    assert r["rows"] == 40 and r["after"] > r["before"] and r["change"] == pytest.approx(r["after"] - r["before"])
    assert 0 < r["change_ci"][0] <= r["change"] <= r["change_ci"][1]
    assert auc_change(before, after, labels, seed=1) == r
    same = auc_change(before, before, labels, seed=1)
    assert same["change"] == 0 and same["change_ci"] == [0.0, 0.0]  # paired: identical scores never differ


def test_summary_line_names_what_a_failed_control_shows_and_its_false_alarm_rate():
    from tsalign.stages.evaluate import summary_line

    outcomes, len_a, len_b, *_ = _control("longer")
    control = {**paired_win_rate(outcomes), **control_checks(outcomes, len_a, len_b, None, None)}
    metrics = {"n": 64, "judge": "rm", "win": 1, "tie": 0, "loss": 0, "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0,
               "lc_win_rate": 1.0, "lc_ci_low": 1.0, "lc_ci_high": 1.0, "reward_delta": 0.1, "reward_delta_ci": [0, 1],
               "control": control, "student_agreement": None, "judge_is_teacher": False}
    line = summary_line(metrics, 0)
    assert "FAILED: the judge prefers the longer answer (p=0.000)" in line and "one run in 20 by chance" in line
    assert "not judged alike" not in line  # the win-rate check passed
