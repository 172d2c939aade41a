"""The shortlist audit's arithmetic: on prompts where the teacher also scored all K candidates, how much of
the teacher's widest margin the shortlist kept, what a random pair keeps, whether the shortlist holds the
teacher's best and worst, and how well the student's scores rank like the teacher's. Pure functions over
scores; tsalign.stages.audit asks the teacher and writes the figures.

Per audited prompt, over its distinct non-empty candidates (tsalign.algorithms.selection.distinct_valid) with
teacher scores T (all K) and student scores S:
- spread: max T - min T (a prompt whose candidates the teacher scores alike tells nothing: left out);
- sent share: (T[c] - T[r]) / spread for the pair rank makes from the shortlist (tsalign.algorithms.selection.decide;
  the teacher orders what it is sent, student_only and confident pairs are ordered by the student, so theirs can be
  negative; no pair keeps 0);
- random share: the mean of |T[a] - T[b]| / spread over all pairs a != b (a random pair, ordered by the teacher);
- containment: the shortlist holds a candidate tied for the teacher's best / worst / both;
- with cut answers never chosen (rank.cut_answers=rejected_only) each figure counts what can become a pair: the best
  is the teacher's best complete answer, and a pair whose teacher-preferred side was cut keeps 0 (audit_prompt).
- Spearman: rank correlation of S and T (average ranks for ties; left out where either is constant).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

from tsalign.algorithms.stats import average_ranks, bootstrap_interval, wilson_interval


@dataclass(frozen=True)
class PromptAudit:
    sent_share: float | None
    random_share: float | None
    has_best: bool
    has_worst: bool
    spearman: float | None


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (Pearson over average ranks); None when either side is constant or shorter than 2."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def usable_gap(teacher: dict[int, float], a: int, b: int, complete: list[bool] | None = None) -> float:
    """The teacher's gap between a and b where that pair makes a training pair, else 0: with `complete` (rank's
    cut_answers=rejected_only), a pair whose teacher-preferred answer was cut at max_new_tokens makes none."""
    high, low = (a, b) if teacher[a] >= teacher[b] else (b, a)
    return 0.0 if complete is not None and not complete[high] else teacher[high] - teacher[low]


def audit_prompt(candidates: list[int], teacher: dict[int, float], student: list[float], shortlist: list[int],
                 decided_by_student: bool = False, complete: list[bool] | None = None) -> PromptAudit:
    """The audit of one prompt. `candidates`: the distinct valid indices; `teacher`: index -> teacher score for
    each of them; `student`: scores of every candidate (indexed like the texts); `shortlist`: what was sent;
    `complete` (rank.cut_answers=rejected_only): False for an answer cut at max_new_tokens, which is never chosen,
    so every figure counts what can become a pair: the widest margin is the teacher's best complete answer over its
    worst, a pair whose teacher-preferred side is cut keeps 0, and "best" is the teacher's best complete answer."""
    from tsalign.algorithms.selection import decide

    choosable = [i for i in candidates if complete is None or complete[i]]
    worst = min(teacher[i] for i in candidates)
    best = max((teacher[i] for i in choosable), default=None)
    has_best = best is not None and any(teacher[i] == best for i in shortlist if i in choosable)
    has_worst = any(teacher[i] == worst for i in shortlist)
    rho = spearman([student[i] for i in candidates], [teacher[i] for i in candidates])
    spread = (best - worst) if best is not None else 0.0
    if spread <= 0 or len(shortlist) < 2:
        return PromptAudit(None, None, has_best, has_worst, rho)
    order = student if decided_by_student else teacher
    verdict = decide(shortlist, [order[i] for i in shortlist], 0.0, complete)  # rank's own rule for the pair
    sent = (teacher[verdict.chosen] - teacher[verdict.rejected]) / spread if verdict else 0.0
    gaps = [usable_gap(teacher, a, b, complete) / spread for a, b in itertools.combinations(candidates, 2)]
    return PromptAudit(sent, statistics.fmean(gaps), has_best, has_worst, rho)


def _mean_interval(values: list[float], confidence: float, seed: int) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    if len(values) < 2:  # one prompt has no spread to resample: no interval rather than a point shown as one
        return values[0], None, None
    low, high = bootstrap_interval(values, confidence=confidence, seed=seed)
    return statistics.fmean(values), low, high


def _rate_interval(hits: list[bool], confidence: float) -> tuple[float | None, float | None, float | None]:
    if not hits:
        return None, None, None
    p = sum(hits) / len(hits)
    low, high = wilson_interval(p, len(hits), confidence)
    return p, low, high


def summarize(audits: list[PromptAudit], confidence: float = 0.95, seed: int = 0) -> dict:
    """The audit's figures over prompts, flat (the summary columns read them by key): each a mean or rate with its
    interval (seeded bootstrap over prompts for means, Wilson for rates; the sent-minus-random difference is paired)."""
    shared = [a for a in audits if a.sent_share is not None]
    out: dict = {"audit_prompts": len(audits), "audit_prompts_with_spread": len(shared)}
    figures = {
        "audit_sent_share": _mean_interval([a.sent_share for a in shared], confidence, seed),
        "audit_random_share": _mean_interval([a.random_share for a in shared], confidence, seed),
        "audit_share_gain": _mean_interval([a.sent_share - a.random_share for a in shared], confidence, seed),
        "audit_spearman": _mean_interval([a.spearman for a in audits if a.spearman is not None], confidence, seed),
        "audit_has_best": _rate_interval([a.has_best for a in audits], confidence),
        "audit_has_worst": _rate_interval([a.has_worst for a in audits], confidence),
        "audit_has_both": _rate_interval([a.has_best and a.has_worst for a in audits], confidence),
    }
    for key, (value, low, high) in figures.items():
        out.update({key: value, f"{key}_ci_low": low, f"{key}_ci_high": high})
    return out


def verdict_line(figures: dict) -> str | None:
    """One line when the shortlist does no better than random pairs (the paired difference's interval reaches 0)."""
    gain, low = figures.get("audit_share_gain"), figures.get("audit_share_gain_ci_low")
    if gain is None or low is None or low > 0:
        return None
    return (f"the student's shortlist kept {figures['audit_sent_share']:.2f} of the teacher's widest margin, random "
            f"pairs {figures['audit_random_share']:.2f} (difference {gain:+.2f} [{low:+.2f}, "
            f"{figures['audit_share_gain_ci_high']:+.2f}], {figures['audit_prompts_with_spread']} audited prompts): "
            "no better than random; with a weak student use a smaller K or rank.selection=all (README, quality)")


def nested_pairs(teacher_scores: list[float | None], complete: list[bool] | None = None) -> list[tuple[int, int, float]]:
    """Teacher pairs from one audited prompt's all-K scores (None: not scored): the teacher's best vs its worst, second
    vs second-worst, ... (K/2 pairs that together carry its whole order), as (chosen, rejected, margin). A tie makes no
    pair; with `complete`, a cut answer is never chosen (it is skipped on the chosen side, as rank does)."""
    order = sorted((k for k, s in enumerate(teacher_scores) if s is not None), key=lambda k: (-teacher_scores[k], k))
    tops = [k for k in order if complete is None or complete[k]]
    out, used = [], set()
    for chosen in tops:
        rejected = next((k for k in reversed(order) if k not in used and k != chosen), None)
        if chosen in used or rejected is None or order.index(chosen) >= order.index(rejected):
            break
        margin = teacher_scores[chosen] - teacher_scores[rejected]
        if margin > 0:
            out.append((chosen, rejected, margin))
        used |= {chosen, rejected}
    return out
