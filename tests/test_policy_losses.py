"""The DCKD / ADPA / dual-clip losses against hand-computed values on toy distributions."""

from __future__ import annotations

import math

import pytest
import torch

from tsalign.algorithms.policy_losses import (
    adpa_loss,
    adpa_term,
    advantage,
    compress_topk,
    dckd_loss,
    dual_clip_dpo_loss,
    token_cross_entropy,
    topk_forward_kl,
)

TEACHER = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_top_k_keeps_the_largest_and_a_remainder_bucket():
    ids, top, rest = compress_topk(logits_of(TEACHER), 2)
    assert ids.tolist() == [0, 1]
    assert top.tolist() == pytest.approx([0.5, 0.3])
    assert rest.item() == pytest.approx(0.2)


def test_forward_kl_on_top_k_plus_remainder_matches_the_hand_value():
    ids, top, rest = compress_topk(logits_of(TEACHER)[None, None], 2)
    uniform = torch.zeros(1, 1, 4)  # the student: 0.25 each, so its remainder (ids 2, 3) holds 0.5
    kl = topk_forward_kl(ids, top, rest, uniform, torch.ones(1, 1))
    hand = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert kl.item() == pytest.approx(hand, abs=1e-6)


def test_kl_is_zero_for_the_same_distribution_and_ignores_masked_positions():
    teacher = torch.stack([logits_of(TEACHER), logits_of([0.1, 0.2, 0.3, 0.4])])[None]  # [1, 2, 4]
    ids, top, rest = compress_topk(teacher, 4)
    assert topk_forward_kl(ids, top, rest, teacher, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone()
    student[0, 1] = torch.zeros(4)  # position 1 disagrees, but it is a prompt token: masked out
    mask = torch.tensor([[1, 0]])
    assert topk_forward_kl(ids, top, rest, student, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert topk_forward_kl(ids, top, rest, student, torch.ones(1, 2)).item() > 0.01


def test_cross_entropy_and_dckd_weights():
    logits = logits_of(TEACHER)[None, None]
    ce = token_cross_entropy(logits, torch.tensor([[1]]), torch.ones(1, 1))
    assert ce.item() == pytest.approx(-math.log(0.3), abs=1e-6)
    loss = dckd_loss(ce, torch.tensor(0.2), torch.tensor(0.4))
    assert loss.item() == pytest.approx(-math.log(0.3) + 0.1 * 0.6, abs=1e-6)


def test_advantage_and_the_expected_advantage_term():
    aligned = torch.tensor([math.log(0.6), math.log(0.2)])
    reference = torch.tensor([math.log(0.3), math.log(0.4)])
    a = advantage(aligned, reference)
    assert a.tolist() == pytest.approx([math.log(2.0), -math.log(2.0)])
    assert advantage(aligned, reference, "positive").tolist() == pytest.approx([math.log(2.0), 0.0])
    with pytest.raises(ValueError, match="clip"):
        advantage(aligned, reference, "sometimes")
    student = logits_of([0.5, 0.25, 0.25])[None, None]  # q on the teacher's ids 0 and 2
    term = adpa_term(student, torch.tensor([[[0, 2]]]), a[None, None], torch.ones(1, 1))
    assert term.item() == pytest.approx(0.5 * math.log(2.0) - 0.25 * math.log(2.0), abs=1e-6)
    assert adpa_loss(torch.tensor(1.0), term).item() == pytest.approx(1.0 - 1.6 * term.item())


def test_dual_clip_is_dpo_inside_the_bounds_and_stops_the_gradient_outside():
    ref = torch.zeros(3)
    chosen = torch.tensor([0.5, 30.0, -30.0], requires_grad=True)  # margins 0.05, 3, -3 at beta 0.1
    loss = dual_clip_dpo_loss(chosen, torch.zeros(3), ref, ref, beta=0.1, low=-1.0, high=1.0)
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-0.05)), abs=1e-6)  # plain DPO
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)  # clipped at high
    assert loss[2].item() == pytest.approx(math.log1p(math.exp(1.0)), abs=1e-6)  # clipped at low
    loss.sum().backward()
    assert chosen.grad[0].item() < 0 and chosen.grad[1].item() == 0.0 and chosen.grad[2].item() == 0.0
    with pytest.raises(ValueError, match="low < high"):
        dual_clip_dpo_loss(chosen, chosen, ref, ref, beta=0.1, low=1.0, high=1.0)
