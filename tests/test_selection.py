"""selection.py on hand-made scores: which candidates the teacher sees and how its verdict becomes a pair."""

from __future__ import annotations

import random

import pytest

from tsalign.algorithms.selection import (
    Verdict,
    decide,
    distinct_valid,
    most_uncertain,
    shortlist,
    student_agrees,
    student_margin,
    teacher_calls,
    within_budget,
)

# five distinct candidates; the student ranks them 3 > 0 > 4 > 1 > 2
TEXTS = ["alpha", "bravo", "charlie", "delta", "echo"]
SCORES = [0.5, -1.0, -2.0, 3.0, 0.0]


# ---------------------------------------------------------------- shortlist


def test_best_worst_is_student_best_then_worst():
    assert shortlist(TEXTS, SCORES, "best_worst") == [3, 2]


def test_student_only_shortlists_the_same_extremes_as_best_worst():
    assert shortlist(TEXTS, SCORES, "student_only") == [3, 2]


def test_top_bottom_m1_equals_best_worst():
    assert shortlist(TEXTS, SCORES, "top_bottom", m=1) == [3, 2]


def test_top_bottom_m2_is_top_two_then_bottom_two():
    assert shortlist(TEXTS, SCORES, "top_bottom", m=2) == [3, 0, 1, 2]


@pytest.mark.parametrize("m", [3, 4, 10])
def test_top_bottom_with_2m_at_least_k_takes_every_candidate_once(m):
    out = shortlist(TEXTS, SCORES, "top_bottom", m=m)
    assert out == [3, 0, 4, 1, 2]  # ranked best first, no index twice


def test_top_bottom_2m_equal_to_k_takes_all():
    four = TEXTS[:4]
    assert shortlist(four, SCORES[:4], "top_bottom", m=2) == [3, 0, 1, 2]


def test_all_is_every_candidate_best_first():
    assert shortlist(TEXTS, SCORES, "all") == [3, 0, 4, 1, 2]


def test_random_pair_is_two_distinct_valid_seeded_indices():
    texts = ["a", "", "b", "c", "   ", "d"]
    scores = [0.0] * len(texts)
    first = shortlist(texts, scores, "random_pair", rng=random.Random(123))
    again = shortlist(texts, scores, "random_pair", rng=random.Random(123))
    assert first == again  # same seed, same pair
    assert len(first) == 2 and first[0] != first[1]
    assert set(first) <= {0, 2, 3, 5}  # never an empty candidate
    assert first == sorted(first)
    # over many draws every valid pair turns up, and the student's scores play no part
    seen = {tuple(shortlist(texts, scores, "random_pair", rng=random.Random(s))) for s in range(200)}
    assert seen == {(i, j) for i in (0, 2, 3, 5) for j in (0, 2, 3, 5) if i < j}


def test_random_pair_draws_differ_along_one_rng():
    rng = random.Random(0)
    draws = {tuple(shortlist(TEXTS, SCORES, "random_pair", rng=rng)) for _ in range(30)}
    assert len(draws) > 1


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="not a valid Selection"):
        shortlist(TEXTS, SCORES, "best_of_n")


def test_student_ties_keep_index_order():
    texts = ["a", "b", "c", "d"]
    assert shortlist(texts, [1.0, 1.0, 0.0, 0.0], "best_worst") == [0, 3]
    assert shortlist(texts, [0.0, 2.0, 2.0, 0.0], "all") == [1, 2, 0, 3]
    assert shortlist(texts, [5.0, 5.0, 5.0, 5.0], "best_worst") == [0, 3]
    assert shortlist(texts, [5.0, 5.0, 5.0, 5.0], "top_bottom", m=1) == [0, 3]


def test_empty_and_whitespace_candidates_are_never_shortlisted():
    texts = ["", "fine answer", "  \n\t", "other answer", " "]
    # the empty ones carry the extreme student scores: they must still be left out
    scores = [100.0, 1.0, -100.0, 0.0, 50.0]
    assert distinct_valid(texts) == [1, 3]
    assert shortlist(texts, scores, "best_worst") == [1, 3]
    assert shortlist(texts, scores, "all") == [1, 3]


def test_duplicate_texts_count_once_first_occurrence_kept():
    texts = ["same", "other", "same", "third", "same "]
    scores = [0.0, 1.0, 9.0, -1.0, -9.0]
    assert distinct_valid(texts) == [0, 1, 3]
    # the duplicates' extreme scores do not pull their copies into the shortlist
    assert shortlist(texts, scores, "best_worst") == [1, 3]
    assert shortlist(texts, scores, "all") == [1, 0, 3]


@pytest.mark.parametrize("strategy", ["best_worst", "top_bottom", "all", "random_pair", "student_only"])
@pytest.mark.parametrize("texts", [["only one"], ["same", "same", "same"], ["x", " x ", "x\n"], ["", "  ", "a"], []])
def test_no_pair_possible_gives_empty_shortlist(strategy, texts):
    assert shortlist(texts, [float(i) for i in range(len(texts))], strategy, rng=random.Random(0)) == []


# ---------------------------------------------------------------- decide


def test_decide_teacher_best_is_chosen_worst_is_rejected_margin_is_gap():
    v = decide([3, 2], [0.25, 1.75])  # the teacher reverses the student
    assert v == Verdict(chosen=2, rejected=3, margin=1.5)


def test_decide_maps_positions_back_to_candidate_indices():
    # shortlist order (by student) differs from index order; judge scores are per shortlist position
    v = decide([4, 0, 7, 2], [0.1, -0.3, 0.9, 0.2])
    assert (v.chosen, v.rejected) == (7, 0)
    assert v.margin == pytest.approx(1.2)


def test_decide_tie_and_threshold():
    assert decide([0, 1], [0.5, 0.5]) is None
    assert decide([0, 1], [0.5, 0.6], tie_threshold=0.1) is None  # gap 0.1 at threshold 0.1
    assert decide([0, 1], [0.5, 0.75], tie_threshold=0.25) is None  # exactly at the threshold: tie
    v = decide([0, 1], [0.5, 0.8], tie_threshold=0.25)
    assert v is not None and v.chosen == 1 and v.margin == pytest.approx(0.3)


def test_decide_needs_two_candidates():
    assert decide([], []) is None
    assert decide([5], [1.0]) is None


def test_decide_teacher_ties_at_the_top_pick_the_first_shortlisted():
    v = decide([6, 1, 3], [0.9, 0.9, 0.1])
    assert (v.chosen, v.rejected) == (6, 3)
    v = decide([6, 1, 3], [0.9, 0.1, 0.1])
    assert (v.chosen, v.rejected) == (6, 3)  # worst tie: the later one is rejected


def test_margin_is_a_float():
    v = decide([0, 1], [2, 0])
    assert isinstance(v.margin, float) and v.margin == 2.0


# ---------------------------------------------------------------- student_agrees


def test_student_agrees():
    v = Verdict(chosen=2, rejected=0, margin=1.0)
    assert student_agrees([0.0, 5.0, 1.0], v) == 1.0
    assert student_agrees([2.0, 5.0, 1.0], v) == 0.0
    assert student_agrees([1.0, 5.0, 1.0], v) == 0.5


def test_best_worst_agreement_is_zero_or_one_never_half_when_student_scores_differ():
    texts, scores = ["a", "b", "c"], [0.3, 0.9, -0.2]
    s = shortlist(texts, scores, "best_worst")
    agree = decide(s, [1.0, 0.0])  # the teacher keeps the student's order
    disagree = decide(s, [0.0, 1.0])
    assert student_agrees(scores, agree) == 1.0
    assert student_agrees(scores, disagree) == 0.0


# ---------------------------------------------------------------- answers cut at max_new_tokens


def test_a_cut_answer_is_never_chosen_but_may_be_rejected():
    texts = ["complete a", "cut b", "complete c", "cut d"]
    student = [0.9, 0.95, 0.1, 0.0]
    complete = [True, False, True, False]
    # the student's best complete answer goes to the teacher, against its worst answer (cut or not)
    assert shortlist(texts, student, "best_worst", complete=complete) == [0, 3]
    assert shortlist(texts, student, "best_worst") == [1, 3]  # without the rule: the cut b
    # the teacher prefers the complete one: a pair with the cut answer rejected
    assert decide([0, 3], [0.9, 0.2], complete=complete) == Verdict(0, 3, pytest.approx(0.7))
    # the teacher prefers the cut one: no pair (the complete one as chosen would contradict the teacher)
    assert decide([0, 3], [0.2, 0.9], complete=complete) is None
    # among three, the best complete answer is chosen against the worst
    assert decide([1, 0, 2], [0.9, 0.5, 0.1], complete=complete) == Verdict(0, 2, pytest.approx(0.4))
    # two cut answers: no pair, whatever the teacher says
    assert decide([1, 3], [0.9, 0.1], complete=complete) is None
    assert decide([1, 3], [0.9, 0.1]) == Verdict(1, 3, pytest.approx(0.8))


def test_all_cut_shortlist_falls_back_to_the_plain_order():
    texts = ["x", "y", "z"]
    assert shortlist(texts, [0.2, 0.5, 0.1], "best_worst", complete=[False, False, False]) == [1, 2]


# ---------------------------------------------------------------- spending the teacher (uncertain, budget)


def test_uncertain_shortlists_the_same_extremes_as_best_worst():
    assert shortlist(TEXTS, SCORES, "uncertain") == [3, 2]


def test_student_margin_is_the_gap_across_the_shortlist():
    assert student_margin(SCORES, [3, 2]) == 5.0
    assert student_margin(SCORES, []) is None


def test_most_uncertain_takes_the_smallest_margins_first():
    margins = [0.9, None, 0.1, 0.5, 0.1]
    assert most_uncertain(margins, 0.5) == [2, 4]  # ceil(0.5 * 4 prompts with a margin), ties by index
    assert most_uncertain(margins, 0.6) == [2, 4, 3]
    assert most_uncertain(margins, 1.0) == [2, 4, 3, 0]
    assert most_uncertain(margins, 0.0) == []
    with pytest.raises(ValueError):
        most_uncertain(margins, 1.5)


def test_teacher_calls_judge_asks_both_orders_reward_model_scores_each():
    assert teacher_calls(2, pairwise=True) == 2 and teacher_calls(4, pairwise=True) == 12
    assert teacher_calls(2, pairwise=False) == 2 and teacher_calls(4, pairwise=False) == 4


def test_within_budget_spends_a_prefix_and_stops_at_the_first_that_does_not_fit():
    costs = {0: 2, 1: 2, 2: 12, 3: 2}
    assert within_budget(costs, [0, 1, 2, 3], None) == ([0, 1, 2, 3], [])
    assert within_budget(costs, [0, 1, 2, 3], 5) == ([0, 1], [2, 3])  # 3 would fit, but the teacher stopped at 2
    assert within_budget(costs, [3, 0], 4) == ([3, 0], [])
    assert within_budget(costs, [0], 0) == ([], [0])


def test_preference_correction_on_reference_pairs():
    """TSO's correction: only a pair of a reference answer vs a policy answer carries a label (reference wins)."""
    from tsalign.algorithms.selection import correct

    sources = ["policy", "reference", "policy", "reference"]
    against, agreed = Verdict(0, 1, 0.5), Verdict(1, 2, 0.5)
    assert correct(against, sources, "override") == (Verdict(1, 0, 0.5), "overridden")
    assert correct(against, sources, "filter") == (None, "filtered")
    assert correct(against, sources, "none") == (against, None)
    assert correct(agreed, sources, "filter") == (agreed, "agreed")
    for unlabelled in (Verdict(0, 2, 1.0), Verdict(1, 3, 1.0)):  # policy vs policy, reference vs reference
        assert correct(unlabelled, sources, "override") == (unlabelled, None)
