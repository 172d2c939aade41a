"""The LLM-judge scorer: both orders combined, round-robin group scores, and the real JudgeScorer on the
tiny policy model with the shipped judge prompt."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml

import tsalign.cli
from tsalign.engines.scoring import make_scorer
from tsalign.engines.scoring.judge import JudgeScorer, combine_orders, round_robin
from tsalign.errors import TsalignError

CONF = Path(tsalign.cli.CONF_DIR)
PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


def cache_dir() -> Path:
    return Path(os.environ.get("TSALIGN_CACHE") or Path.home() / ".cache" / "tsalign").expanduser()


# ---------------------------------------------------------------- pure helpers


def test_position_biased_judge_is_a_tie():
    # always answers "first slot" with the same confidence, whichever response sits there
    for p in (0.5, 0.7, 0.99, 1.0):
        assert combine_orders(p, p) == pytest.approx(0.5)


def test_consistent_judge_gets_its_probability():
    # prefers a with probability 0.8: 0.8 when a is first, 0.2 (b wins the first slot) when b is first
    assert combine_orders(0.8, 0.2) == pytest.approx(0.8)
    assert combine_orders(0.2, 0.8) == pytest.approx(0.2)
    assert combine_orders(1.0, 0.0) == 1.0
    # an inconsistent judge is averaged: 0.9 with a first, 0.4 with b first -> (0.9 + 0.6) / 2
    assert combine_orders(0.9, 0.4) == pytest.approx(0.75)


def test_round_robin_hand_values():
    # P(0>1)=0.9, P(0>2)=0.6, P(1>2)=0.3
    scores = round_robin(3, {(0, 1): 0.9, (0, 2): 0.6, (1, 2): 0.3})
    assert scores == pytest.approx([(0.9 + 0.6) / 2, (0.1 + 0.3) / 2, (0.4 + 0.7) / 2])
    assert sum(scores) == pytest.approx(1.5)
    assert round_robin(2, {(0, 1): 0.25}) == pytest.approx([0.25, 0.75])
    assert round_robin(1, {}) == [0.5]
    assert round_robin(4, {(i, j): 0.5 for i in range(4) for j in range(i + 1, 4)}) == pytest.approx([0.5] * 4)


class _LengthJudge(JudgeScorer):
    """A JudgeScorer without a model: P(first slot wins) = sigmoid(len(first) - len(second)) + position bias."""

    def __init__(self, bias: float = 0.0):
        self.batch_size = 8
        self.bias = bias
        self.stats = {"calls": 0, "truncated": 0, "seconds": 0.0, "first_position_picks": 0}

    def _p_first(self, items):
        out = [min(1.0, 1 / (1 + math.exp(-(len(a) - len(b)))) + self.bias) for _, a, b in items]
        self.stats["calls"] += len(items)
        self.stats["first_position_picks"] += sum(p > 0.5 for p in out)
        return out


def test_score_groups_wiring_maps_pairs_back_to_candidates():
    judge = _LengthJudge()
    groups = [["ccc", "a", "bb"], ["xx", "y"], ["solo"]]
    scores = judge.score_groups([PROMPT] * 3, groups)
    def s(x):
        return 1 / (1 + math.exp(-x))
    assert scores[0] == pytest.approx([(s(2) + s(1)) / 2, (s(-2) + s(-1)) / 2, (s(1) + s(-1)) / 2])
    assert scores[1] == pytest.approx([s(1), s(-1)])
    assert scores[2] == [0.5]
    assert judge.stats["calls"] == 2 * (3 + 1)  # every pair asked in both orders
    assert max(range(3), key=lambda i: scores[0][i]) == 0  # the longest wins under this judge


def test_position_bias_cancels_and_is_reported():
    judge = _LengthJudge(bias=0.3)
    p = judge.compare([PROMPT], ["same"], ["SAME"])  # equal lengths: only the bias speaks
    assert p == pytest.approx([0.5])
    assert judge.first_position_rate == 1.0


# ---------------------------------------------------------------- the real scorer on the tiny model


@pytest.fixture(scope="module")
def judge_conf() -> dict:
    return yaml.safe_load((CONF / "teacher" / "smollm2_judge.yaml").read_text())


@pytest.fixture(scope="module")
def tiny_judge(judge_conf):
    from tsalign.engines.models import resolve_model_dir

    policy = yaml.safe_load((CONF / "policy" / "tiny.yaml").read_text())
    model_dir = resolve_model_dir(policy["path"], cache_dir(), tiny=policy["tiny"], kind="causal_lm", seed=0)
    scorer = make_scorer("judge", model_dir, batch_size=judge_conf["batch_size"], max_length=judge_conf["max_length"],
                         judge_prompt=judge_conf["judge_prompt"], judge_choices=tuple(judge_conf["judge_choices"]))
    assert isinstance(scorer, JudgeScorer)
    yield scorer
    scorer.close()


A = ["4", "It is four, obviously; two plus two makes four, and here is why. " * 3, "five"]
B = ["no", "four", "It equals 4."]


def test_real_judge_order_swap_symmetry_and_call_counts(tiny_judge):
    before = tiny_judge.stats["calls"]
    ab = tiny_judge.compare([PROMPT] * 3, A, B)
    ba = tiny_judge.compare([PROMPT] * 3, B, A)
    assert tiny_judge.stats["calls"] - before == 2 * 2 * 3  # two compare() calls, both orders each
    for x, y in zip(ab, ba):
        assert 0.0 <= x <= 1.0
        assert x + y == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= tiny_judge.first_position_rate <= 1.0
    assert tiny_judge.stats["truncated"] == 0


def test_real_judge_batched_equals_one_by_one(tiny_judge):
    """Left padding must not change a verdict: the last position is the real next-token position."""
    batched = tiny_judge._p_first([(PROMPT, a, b) for a, b in zip(A, B)])
    single = [tiny_judge._p_first([(PROMPT, a, b)])[0] for a, b in zip(A, B)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert max(single) - min(single) > 1e-4  # the inputs do matter, so the check above means something


def test_real_judge_score_groups_are_means_of_pairwise_probabilities(tiny_judge):
    before = tiny_judge.stats["calls"]
    group = ["Four.", "2 + 2 = 4 because adding two and two gives four.", "I do not know."]
    (scores,) = tiny_judge.score_groups([PROMPT], [group])
    assert tiny_judge.stats["calls"] - before == 3 * 2  # 3 pairs x 2 orders
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) == pytest.approx(3 * 0.5, abs=1e-5)
    p01, p02, p12 = (tiny_judge.compare([PROMPT], [group[i]], [group[j]])[0] for i, j in ((0, 1), (0, 2), (1, 2)))
    assert scores == pytest.approx([(p01 + p02) / 2, (1 - p01 + p12) / 2, (1 - p02 + 1 - p12) / 2], abs=1e-5)


def test_real_judge_truncates_long_inputs_and_counts_it(judge_conf, tiny_judge):
    long = "word " * 2000
    before = tiny_judge.stats["truncated"]
    ids = tiny_judge._render([{"role": "user", "content": long}], long, "short")
    assert len(ids) <= tiny_judge.max_length
    assert tiny_judge.stats["truncated"] - before == 2  # the request and response A were cut
    text = tiny_judge.tokenizer.decode(ids)
    assert "short" in text and "Better response (A or B):" in text


def test_judge_needs_a_prompt_and_distinct_choices(tiny_judge):
    with pytest.raises(TsalignError, match="judge_prompt"):
        make_scorer("judge", Path("/nonexistent"), judge_prompt=None)
    model_dir = Path(tiny_judge.model.name_or_path)
    with pytest.raises(TsalignError, match="two different tokens"):
        JudgeScorer(model_dir, template="{prompt}{response_a}{response_b}", choices=("A", "A"))
