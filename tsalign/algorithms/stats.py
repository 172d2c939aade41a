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


def bootstrap_interval(values: list[float], statistic=None, confidence: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `statistic` (default: the mean) over resamples of `values` (paired rows
    stay together when values are tuples). Seeded: the same inputs give the same interval."""
    import random

    if not values:
        return math.nan, math.nan
    stat = statistic or statistics.fmean
    rng = random.Random(seed)
    n = len(values)
    draws = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    tail = (1 - confidence) / 2
    return draws[int(tail * (n_boot - 1))], draws[int(math.ceil((1 - tail) * (n_boot - 1)))]


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, tied values sharing their average rank: O(n log n)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auc(scores: list[float], labels: list[bool]) -> float:
    """How often a random positive scores above a random negative, ties half (Mann-Whitney U / (P N)),
    from average ranks."""
    ranks = average_ranks(scores)
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return math.nan
    rank_sum = sum(r for r, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auc_change(before: list[float], after: list[float], labels: list[bool], confidence: float = 0.95,
               seed: int = 0, n_boot: int = 1000) -> dict:
    """AUC before and after (the same rows scored twice) and the change, with a seeded paired bootstrap
    interval over rows (a row keeps its label and both scores)."""
    rows = list(zip(before, after, labels))

    def change(sample: list[tuple]) -> float:
        b, a, y = zip(*sample)
        return auc(list(a), list(y)) - auc(list(b), list(y))

    low, high = bootstrap_interval(rows, change, confidence, n_boot, seed)
    first, second = auc(before, labels), auc(after, labels)
    return {"rows": len(rows), "before": first, "after": second, "change": second - first, "change_ci": [low, high]}


def paired_win_rate(outcomes: list[float], confidence: float = 0.95, seed: int = 0) -> dict:
    """Win / tie / loss and the win rate (ties half) with a seeded bootstrap interval over prompts."""
    rate = statistics.fmean(outcomes) if outcomes else math.nan
    low, high = bootstrap_interval(outcomes, confidence=confidence, seed=seed)
    return {"n": len(outcomes), "win": sum(o == 1.0 for o in outcomes), "tie": sum(o == 0.5 for o in outcomes),
            "loss": sum(o == 0.0 for o in outcomes), "win_rate": rate, "ci_low": low, "ci_high": high,
            "confidence": confidence, "interval": "paired bootstrap"}


def length_feature(len_a: list[float], len_b: list[float]) -> list[float]:
    """AlpacaEval 2.0's length term: tanh(length difference / its standard deviation)."""
    diffs = [a - b for a, b in zip(len_a, len_b)]
    sd = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    return [math.tanh(d / sd) if sd > 0 else 0.0 for d in diffs]


def fit_logistic(x: list[float], y: list[float], l2: float = 1e-3, steps: int = 50) -> tuple[float, float]:
    """(intercept, slope) of P(y=1) = sigmoid(a + b x) by Newton's method; y may be soft (ties 0.5).
    A small L2 penalty keeps the fit finite when the data are separable (every win longer, say)."""
    a = b = 0.0
    for _ in range(steps):
        p = [1 / (1 + math.exp(-(a + b * xi))) for xi in x]
        w = [pi * (1 - pi) for pi in p]
        ga = sum(pi - yi for pi, yi in zip(p, y)) + l2 * a
        gb = sum((pi - yi) * xi for pi, yi, xi in zip(p, y, x)) + l2 * b
        haa, hab = sum(w) + l2, sum(wi * xi for wi, xi in zip(w, x))
        hbb = sum(wi * xi * xi for wi, xi in zip(w, x)) + l2
        det = haa * hbb - hab * hab
        if det <= 1e-12:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-10:
            break
    return a, b


def length_controlled_win_rate(outcomes: list[float], len_policy: list[float], len_base: list[float],
                               confidence: float = 0.95, seed: int = 0) -> dict:
    """AlpacaEval 2.0's idea on one policy pair: model the judge's preference as
    logit P(policy wins) = a + b * tanh(len_diff / sd(len_diff)) and report the win rate at equal
    length, sigmoid(a), with a seeded bootstrap interval (the model refitted on each resample).
    `length_coef` b > 0: the judge favours the longer answer."""
    if not outcomes:
        return {"lc_win_rate": math.nan, "lc_ci_low": math.nan, "lc_ci_high": math.nan, "length_coef": math.nan}
    x = length_feature(len_policy, len_base)

    def at_equal_length(rows) -> float:
        a, _ = fit_logistic([r[0] for r in rows], [r[1] for r in rows])
        return 1 / (1 + math.exp(-a))

    rows = list(zip(x, outcomes))
    a, b = fit_logistic(x, outcomes)
    low, high = bootstrap_interval(rows, at_equal_length, confidence, n_boot=500, seed=seed)
    return {"lc_win_rate": 1 / (1 + math.exp(-a)), "lc_ci_low": low, "lc_ci_high": high, "length_coef": b}


def sign_test(hits: int, trials: int) -> float:
    """Two-sided exact p-value of `hits` in `trials` fair coin flips (the sign test; ties left out before)."""
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, i) for i in range(min(hits, trials - hits) + 1)) / 2**trials
    return min(1.0, 2 * tail)


def control_checks(control_outcomes: list[float], len_a: list[float], len_b: list[float],
                   first_slot_picks: int | None, single_order_verdicts: int | None,
                   confidence: float = 0.95) -> dict:
    """Bias checks on the base-vs-base control (pi_0 against pi_0 with another seed). The arms are
    exchangeable, so for an unbiased judge and a pipeline that treats both arms alike each count below
    is a fair coin; each check is an exact two-sided sign test at a Bonferroni-corrected level, so an
    unbiased judge fails the control in at most 1 - confidence of runs (one in twenty at 95%) whatever
    the number of prompts (more prompts catch smaller biases, not more false alarms):
    - win_rate: the control arm's wins against its losses (ties left out). A length or slot preference
      does not move it when the judge is asked both orders: it shows arms judged or sampled unalike
      (a single-order judge's slot, answers cut or sampled differently);
    - position (pairwise judges): how often a single-order verdict picked the first slot; a judge that
      answers by position fails it, although averaging both orders hides that in the win rate;
    - length: how often the longer answer won a decided pair of unequal lengths; a judge that rewards
      length fails it (then read the length-controlled win rate, not the raw one)."""
    checks = {"win_rate": {"value": statistics.fmean(control_outcomes) if control_outcomes else math.nan,
                           "hits": sum(o == 1.0 for o in control_outcomes),
                           "trials": sum(o != 0.5 for o in control_outcomes)}}
    if single_order_verdicts:
        checks["position"] = {"value": first_slot_picks / single_order_verdicts, "hits": first_slot_picks,
                              "trials": single_order_verdicts}
    decided = [(la, lb) if o == 1.0 else (lb, la) for o, la, lb in zip(control_outcomes, len_a, len_b)
               if o != 0.5 and la != lb]
    if decided:
        hits = sum(winner > loser for winner, loser in decided)
        checks["length"] = {"value": hits / len(decided), "hits": hits, "trials": len(decided)}
    level = (1 - confidence) / len(checks)
    for check in checks.values():
        check["p_value"] = sign_test(check["hits"], check["trials"])
        check["passed"] = check["p_value"] >= level
    return {"passed": all(c["passed"] for c in checks.values()), "level_per_check": level, "checks": checks}
