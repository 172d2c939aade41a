"""Pairwise ranking losses for reward models (unit-tested against hand-computed values).

Bradley-Terry: P(chosen > rejected) = sigmoid(r_c - r_r); loss = -log sigmoid(r_c - r_r - m), where
the optional margin m (the teacher's score gap) asks for a larger gap on clearer pairs, as in
Llama-2's reward model and TRL's RewardTrainer `margin` column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(r_chosen: list[float], r_rejected: list[float]) -> float:
    """How often chosen outscores rejected; exact ties count half."""
    if not r_chosen:
        return float("nan")
    hits = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected))
    return hits / len(r_chosen)
