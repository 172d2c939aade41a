"""losses.py against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from tsalign.algorithms.losses import bradley_terry_loss, pairwise_accuracy


def nlsig(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log1p(math.exp(-x))


def test_hand_computed_values():
    assert nlsig(1.0) == pytest.approx(0.31326, abs=1e-5)
    assert nlsig(0.0) == pytest.approx(0.69315, abs=1e-5)
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.dim() == 0
    assert loss.item() == pytest.approx((0.3132617 + 0.6931472) / 2, abs=1e-6)


def test_reversed_pair_costs_more():
    right = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0])).item()
    wrong = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([3.0])).item()
    assert right == pytest.approx(nlsig(2.0), abs=1e-6)
    assert wrong == pytest.approx(nlsig(-2.0), abs=1e-6)
    assert wrong - right == pytest.approx(2.0, abs=1e-6)  # log-odds: softplus(2) - softplus(-2) = 2


def test_margin_is_subtracted_from_the_gap():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    loss = bradley_terry_loss(rc, rr, torch.tensor([0.5, 1.0])).item()
    assert loss == pytest.approx((nlsig(0.5) + nlsig(-1.0)) / 2, abs=1e-6)
    # a margin equal to the gap gives log 2 whatever the gap
    assert bradley_terry_loss(torch.tensor([7.0]), torch.tensor([4.0]), torch.tensor([3.0])).item() == \
        pytest.approx(math.log(2), abs=1e-6)
    # zero margin is no margin
    assert bradley_terry_loss(rc, rr, torch.zeros(2)).item() == pytest.approx(bradley_terry_loss(rc, rr).item())


def test_large_gaps_are_numerically_stable():
    loss = bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(100.0, abs=1e-4)  # mean(200, ~0)


def test_gradient_pushes_chosen_up_and_rejected_down():
    rc = torch.tensor([0.3, -1.0], requires_grad=True)
    rr = torch.tensor([0.1, 2.0], requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    assert (rc.grad < 0).all()  # raising r_chosen lowers the loss
    assert (rr.grad > 0).all()
    # d/dx -log sigmoid(x) = -(1 - sigmoid(x)), averaged over the batch of 2
    expected = [-(1 - 1 / (1 + math.exp(-d))) / 2 for d in (0.2, -3.0)]
    assert rc.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert rr.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-6)


def test_raising_chosen_lowers_the_loss():
    rr = torch.tensor([0.0])
    losses = [bradley_terry_loss(torch.tensor([c]), rr).item() for c in (-2.0, 0.0, 2.0)]
    assert losses[0] > losses[1] > losses[2]


def test_pairwise_accuracy_ties_half():
    assert pairwise_accuracy([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert pairwise_accuracy([1.0], [1.0]) == 0.5
    assert pairwise_accuracy([0.0, 0.0], [1.0, 1.0]) == 0.0


def test_pairwise_accuracy_empty_is_nan():
    assert math.isnan(pairwise_accuracy([], []))
