"""TSO's dual-clip DPO loss inside TRL's DPOTrainer (`dpo.loss_type=dual_clip`).

TRL 1.16's DPOTrainer computes every loss inside one `_compute_loss` with no per-loss hook. Its
"sigmoid" loss is `-F.logsigmoid(beta * delta)`, the only `F.logsigmoid` call on that path (reverse-KL
DPO). The subclass below runs TRL's own `_compute_loss` with that module's `F` replaced by a namespace
whose `logsigmoid` clamps its argument to [low, high] first, which is exactly
`tsalign.algorithms.policy_losses.dual_clip_dpo_loss`; everything else (log-probabilities, reference, metrics,
DeepSpeed/FSDP) stays TRL's. tests/test_dpo.py checks the loss value and that the gradient vanishes
outside the bounds, so a TRL upgrade that changes that line fails a test instead of silently training
plain DPO.
"""

from __future__ import annotations

import contextlib
import types

import torch.nn.functional as F


@contextlib.contextmanager
def clipped_logsigmoid(module, low: float, high: float):
    """While inside, `module.F.logsigmoid(x)` is `logsigmoid(clamp(x, low, high))`."""
    original = module.F
    module.F = types.SimpleNamespace(**{**vars(F), "logsigmoid": lambda x: F.logsigmoid(x.clamp(low, high))})
    try:
        yield
    finally:
        module.F = original


def dual_clip_trainer(low: float, high: float):
    """A DPOTrainer subclass whose sigmoid loss is clipped to [low, high] (TSO's dual clip, our reading)."""
    import trl.trainer.dpo_trainer as trl_dpo

    class DualClipDPOTrainer(trl_dpo.DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            with clipped_logsigmoid(trl_dpo, low, high):
                return super()._compute_loss(model, inputs, return_outputs)

    return DualClipDPOTrainer


def trained_dtype(cfg) -> str:
    """The dtype the trained weights are held in. Full DPO keeps an fp32 master copy (bf16 only as
    autocast, DPOConfig.bf16): at a DPO learning rate (5e-7) most updates to bf16 weights round away.
    With LoRA the frozen base stays in policy.dtype and the adapter trains in fp32 (PEFT's default)."""
    return cfg.policy.dtype if cfg.dpo.lora else "float32"
