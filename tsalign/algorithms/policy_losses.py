"""Token-level losses of the policy-distillation methods (DCKD, ADPA) and TSO's dual-clip DPO loss.

Pure tensor functions, no models; unit-tested on hand-computed toy distributions (tests/test_policy_losses.py).

Teacher distributions are stored compressed, as in the ADPA authors' released code: per position the
teacher's top-k token ids with their probabilities, plus one "remainder" bucket holding the rest of the
mass. The student's distribution is gathered on the same ids, with its own remainder, so both are
(k + 1)-way distributions over the same buckets.

    DCKD  = w_ce * CE(student, chosen) + w_kl * (KL_chosen + KL_rejected),   KL = mean_t KL(p_teacher || q_student)
    ADPA  = w_ce * CE(student, chosen) - w_adv * mean_t sum_v q_student(v | s_t) * A(s_t, v),
            A(s_t, v) = log pi_aligned(v | s_t) - log pi_ref(v | s_t) on the aligned teacher's top-k ids
    TSO dual clip (our reading of the abstract, not the paper's code):
            m = beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]
            loss = -log sigmoid(clamp(m, low, high))
    The clamp stops the gradient outside [low, high]: pairs already separated by more than `high` stop
    pushing (no over-optimisation of an easy pair), and pairs the policy rejects by more than `-low`
    (likely wrong labels) stop pulling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-12  # keeps log(0) finite for an empty remainder bucket


def compress_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [..., k], probs [..., k], remainder [...]) of a distribution given as logits [..., V]."""
    probs = logits.float().softmax(-1)
    top, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return ids, top, (1.0 - top.sum(-1)).clamp_min(0.0)


def gather_with_remainder(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's log-probabilities on the teacher's ids [..., k], and the log of its remaining mass [...]."""
    logp = logits.float().log_softmax(-1)
    on_ids = logp.gather(-1, ids)
    remainder = (1.0 - on_ids.exp().sum(-1)).clamp_min(_TINY)
    return on_ids, remainder.log()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T] over positions where `mask` is true (response tokens, not prompt or padding)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def topk_forward_kl(teacher_ids: torch.Tensor, teacher_probs: torch.Tensor, teacher_rest: torch.Tensor,
                    student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t KL(p_teacher || q_student) over the (k + 1) buckets, on masked positions [B, T]."""
    q_ids, q_rest = gather_with_remainder(student_logits, teacher_ids)
    p = teacher_probs.float()
    on_ids = (p * (p.clamp_min(_TINY).log() - q_ids)).sum(-1)
    rest = teacher_rest.float()
    kl = on_ids + rest * (rest.clamp_min(_TINY).log() - q_rest)
    return masked_mean(kl, mask)


def token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the labels [B, T] (already aligned with the logits) on masked positions."""
    nll = -student_logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, mask)


def dckd_loss(ce_chosen: torch.Tensor, kl_chosen: torch.Tensor, kl_rejected: torch.Tensor,
              ce_weight: float = 1.0, kl_weight: float = 0.1) -> torch.Tensor:
    """DCKD: the SFT term on the chosen answer plus both KL constraints (weights of the released code)."""
    return ce_weight * ce_chosen + kl_weight * (kl_chosen + kl_rejected)


def advantage(aligned_logp: torch.Tensor, reference_logp: torch.Tensor, clip: str = "none") -> torch.Tensor:
    """A(s, v) = log pi_aligned(v|s) - log pi_ref(v|s) on the aligned teacher's top-k ids.
    clip: "none" keeps the sign (the paper's idea), "positive" keeps max(A, 0) (what the released code's
    probability-stabilising helper ends up doing)."""
    a = aligned_logp.float() - reference_logp.float()
    if clip == "none":
        return a
    if clip == "positive":
        return a.clamp_min(0.0)
    raise ValueError(f"advantage clip must be 'none' or 'positive', not {clip!r}")


def adpa_term(student_logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t sum_v q_student(v | s_t) * A(s_t, v) over the teacher's top-k ids: the expected advantage."""
    q_ids, _ = gather_with_remainder(student_logits, ids)
    return masked_mean((q_ids.exp() * adv).sum(-1), mask)


def adpa_loss(ce_chosen: torch.Tensor, expected_advantage: torch.Tensor, ce_weight: float = 1.0,
              advantage_weight: float = 1.6) -> torch.Tensor:
    """ADPA: the SFT term minus the weighted expected advantage (maximised)."""
    return ce_weight * ce_chosen - advantage_weight * expected_advantage


def dual_clip_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                       ref_rejected: torch.Tensor, beta: float, low: float, high: float) -> torch.Tensor:
    """Per-pair dual-clip DPO loss from sequence log-probabilities [B] (see the module docstring)."""
    if not low < high:
        raise ValueError(f"dual clip needs low < high, got [{low}, {high}]")
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin.clamp(low, high))
