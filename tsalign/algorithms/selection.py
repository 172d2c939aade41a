"""Which candidates the teacher sees, and how its verdict becomes a (chosen, rejected) pair.

Pure functions over scores and texts, no models. TS-Align's default (`best_worst`): the student
scores all K candidates, its best and its worst go to the teacher, and the teacher's order decides
chosen vs rejected, with the teacher's score gap as the margin. Cost: the teacher sees 2 of K.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tsalign.config.choices import Correction, Selection


def distinct_valid(texts: list[str]) -> list[int]:
    """Indices of non-empty candidates, first occurrence of each distinct text only."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        key = t.strip()
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def shortlist(texts: list[str], student_scores: list[float], strategy: str = Selection.best_worst, m: int = 1,
              rng: random.Random | None = None, complete: list[bool] | None = None) -> list[int]:
    """Candidate indices the teacher scores ([] = no pair possible). Ties in student score keep index order.
    With `complete` (False for an answer cut at max_new_tokens), best_worst's best is the student's best
    complete answer, since a cut one could not be chosen anyway."""
    strategy = Selection(strategy)
    pool = distinct_valid(texts)
    if len(pool) < 2:
        return []
    ranked = sorted(pool, key=lambda i: (-student_scores[i], i))  # best first
    if strategy in (Selection.best_worst, Selection.student_only, Selection.uncertain):
        best = next((i for i in ranked if complete is None or complete[i]), ranked[0])
        return [best, next(i for i in reversed(ranked) if i != best)]
    if strategy is Selection.top_bottom:
        return ranked if 2 * m >= len(ranked) else ranked[:m] + ranked[-m:]
    if strategy is Selection.all:
        return ranked
    return sorted((rng or random.Random(0)).sample(pool, 2))  # Selection.random_pair


@dataclass(frozen=True)
class Verdict:
    chosen: int
    rejected: int
    margin: float


def decide(candidates: list[int], judge_scores: list[float], tie_threshold: float = 0.0,
           complete: list[bool] | None = None) -> Verdict | None:
    """Best vs worst by the judge among the shortlisted `candidates`; None on a tie (gap <= threshold).
    With `complete` (indexed like the candidates' texts), the chosen is the judge's best complete answer
    and a cut one can only be rejected: None when no shortlisted answer is complete, or when the judge
    prefers a cut answer to every complete one (training the complete one as chosen would contradict it)."""
    if len(candidates) < 2:
        return None
    order = sorted(range(len(candidates)), key=lambda k: (-judge_scores[k], k))
    eligible = [k for k in order if complete is None or complete[candidates[k]]]
    if not eligible:
        return None
    best = eligible[0]
    worst = order[-1] if order[-1] != best else order[-2]
    margin = judge_scores[best] - judge_scores[worst]
    if margin <= tie_threshold:
        return None
    return Verdict(candidates[best], candidates[worst], float(margin))


def student_agrees(student_scores: list[float], verdict: Verdict) -> float:
    """1 if the student orders the pair as the teacher did, 0 if reversed, 0.5 on a student tie."""
    c, r = student_scores[verdict.chosen], student_scores[verdict.rejected]
    return 1.0 if c > r else 0.5 if c == r else 0.0


# ---------------------------------------------------------------- spending the teacher


def student_margin(student_scores: list[float], candidates: list[int]) -> float | None:
    """The student's score gap across a shortlist (best - worst); None when there is no pair to ask about."""
    if len(candidates) < 2:
        return None
    values = [student_scores[k] for k in candidates]
    return max(values) - min(values)


def most_uncertain(margins: list[float | None], fraction: float) -> list[int]:
    """Prompts where the student is least sure: the ceil(fraction * n) smallest margins of the n prompts
    that have one, smallest first (ties by index). A small margin is where the student's order is most
    likely wrong, so the teacher's verdict is worth most there."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1]")
    ranked = sorted((m, i) for i, m in enumerate(margins) if m is not None)
    return [i for _, i in ranked[: math.ceil(fraction * len(ranked) - 1e-9)]]


def teacher_calls(n_candidates: int, pairwise: bool) -> int:
    """Calls the teacher makes on a shortlist: a pairwise judge asks each pair in both orders, a reward
    model scores each candidate once."""
    return n_candidates * (n_candidates - 1) if pairwise else n_candidates


def within_budget(costs: dict[int, int], order: list[int], budget: int | None) -> tuple[list[int], list[int]]:
    """(prompts the teacher is asked on, prompts past the budget), taken in `order`. Stops at the first
    prompt that does not fit: the budget is spent on a prefix, as if the teacher were stopped there."""
    if budget is None:
        return list(order), []
    spent = 0
    for n, i in enumerate(order):
        if spent + costs[i] > budget:
            return list(order[:n]), list(order[n:])
        spent += costs[i]
    return list(order), []


REFERENCE = "reference"  # a candidate's source when it is the prompt's reference answer (generate.references)


def correct(verdict: Verdict, sources: list[str], mode: str) -> tuple[Verdict | None, str | None]:
    """(the verdict after TSO's preference correction, what happened: None = no label for this pair,
    "agreed", "overridden" or "filtered"). A label exists when exactly one side is a reference answer."""
    chosen_ref, rejected_ref = sources[verdict.chosen] == REFERENCE, sources[verdict.rejected] == REFERENCE
    if Correction(mode) is Correction.none or chosen_ref == rejected_ref:
        return verdict, None
    if chosen_ref:
        return verdict, "agreed"
    if Correction(mode) is Correction.filter:
        return None, "filtered"
    return Verdict(verdict.rejected, verdict.chosen, verdict.margin), "overridden"
