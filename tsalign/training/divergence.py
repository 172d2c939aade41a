"""Training that diverges is stopped and never saved: DPO, distill and the teacher fit share one rule.

A training run has diverged when
  - a logged number (loss, grad norm, rewards, log-probs) is not finite, or
  - the loss exceeds both EXPLODE_FACTOR x the first logged loss and EXPLODE_FLOOR, or
  - a weight is not finite when the model is about to be saved, or the largest weight grew past both
    WEIGHT_FACTOR x the largest before training and WEIGHT_FLOOR (fine-tuning moves weights by
    learning-rate-sized steps; a run that "fits" its pairs with weights in the thousands has a finite,
    even small, loss and is still broken: distill.learning_rate=1e3 does exactly that).
The floor keeps a loss that starts near 0 from tripping on noise (0.01 -> 0.2 is not divergence);
the factor is relative because loss types start at different values (sigmoid DPO and Bradley-Terry
at ln 2 = 0.69, so the limit is 6.9; IPO near 1/(2 beta)^2). A sane run at a sane learning rate
stays far below it; `optimizer.learning_rate=1e3` crosses it (or turns NaN) within two steps.
"""

from __future__ import annotations

import math

from tsalign.errors import TsalignError

EXPLODE_FACTOR = 10.0
EXPLODE_FLOOR = 5.0
WEIGHT_FACTOR = 100.0
WEIGHT_FLOOR = 1000.0


class TrainingDiverged(TsalignError):
    pass


def loss_limit(first_loss: float) -> float:
    return max(EXPLODE_FACTOR * first_loss, EXPLODE_FLOOR)


def divergence(values: dict, first_loss: float | None) -> str | None:
    """Why these logged values show a diverged run, or None when they look sane."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} is {value}"
    loss = values.get("loss")
    if isinstance(loss, (int, float)) and first_loss is not None and loss > loss_limit(first_loss):
        return f"loss {loss:.4g} exploded (first {first_loss:.4g}, limit {loss_limit(first_loss):.4g})"
    return None


def non_finite_weight(model) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None."""
    import torch

    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return name
    return None


def largest_weight(model) -> float:
    return max((p.detach().abs().max().item() for p in model.parameters() if p.numel()), default=0.0)


def diverged(what: str, where: str, reason: str, key: str, value) -> TrainingDiverged:
    """The one-line error: what diverged, why, and the key to change."""
    return TrainingDiverged(f"{what} diverged {where} ({reason}); nothing was saved and earlier finished work is "
                            f"untouched: lower {key} (now {value}) and rerun")


def check_weights(model, what: str, key: str, value, largest_before: float | None = None) -> None:
    """Refuse to save a model with a NaN or infinite weight, or one whose largest weight blew up."""
    bad = non_finite_weight(model)
    if bad is not None:
        raise diverged(what, "before saving", f"weight {bad} is not finite", key, value)
    if largest_before is not None:
        after = largest_weight(model)
        if after > max(WEIGHT_FACTOR * largest_before, WEIGHT_FLOOR):
            raise diverged(what, "before saving", f"the largest weight grew from {largest_before:.3g} to {after:.3g}",
                           key, value)
