"""The student's training: transformers' Trainer on the losses of tsalign.algorithms.policy_losses, one Trainer
per phase of pdistill.loss, set up as dpo's is (tsalign.training.trainer).

    model, counts = train(ctx, setup, {"dckd": rows, "adpa": rows})
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.contract import StageContext
from tsalign.stages.pdistill.data import Example, Setup
from tsalign.stages.pdistill.sources import phases
from tsalign.training.trainer import log_stats, report_steps, setup_errors, step_callback, trainer_arguments

MEASURED = 32  # examples the before / after numbers are taken on (the first ones: the same both times)
PARTS = ("ce_chosen", "kl_chosen", "kl_rejected", "expected_advantage")  # what the step lines show


def collate(examples: list[Example], pad_id: int) -> dict:
    """chosen sequences first, then the others; per position t the tensors describe the token at t + 1."""
    import torch

    seqs = [(e.chosen, e.chosen_rows) for e in examples] + [(e.other, e.other_rows) for e in examples]
    n, width, k = len(seqs), max(len(s.ids) for s, _ in seqs), examples[0].other_rows["ids"].shape[-1]
    batch = {"input_ids": torch.full((n, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long),
             "mask": torch.zeros((n, width - 1), dtype=torch.bool),
             "teacher_ids": torch.zeros((n, width - 1, k), dtype=torch.long),
             "teacher_probs": torch.zeros((n, width - 1, k)), "teacher_rest": torch.zeros((n, width - 1)),
             "reference_logp": torch.zeros((n, width - 1, k))}
    for i, (seq, rows) in enumerate(seqs):
        length, span = len(seq.ids), slice(seq.start - 1, len(seq.ids) - 1)
        batch["input_ids"][i, :length] = torch.tensor(seq.ids)
        batch["attention_mask"][i, :length] = 1
        batch["mask"][i, span] = True
        if rows is not None:
            batch["teacher_ids"][i, span] = rows["ids"].long()
            batch["teacher_probs"][i, span] = rows["probs"]
            batch["teacher_rest"][i, span] = rows["rest"]
            if "ref_logp" in rows:
                batch["reference_logp"][i, span] = rows["ref_logp"]
    batch["targets"] = batch["input_ids"][:, 1:].clone()
    return batch


def batch_loss(model, batch: dict, phase: str, p: DictConfig):
    """(loss, its parts as floats) of one collated batch (tsalign.algorithms.policy_losses)."""
    from tsalign.algorithms.policy_losses import (
        adpa_loss,
        adpa_term,
        advantage,
        dckd_loss,
        token_cross_entropy,
        topk_forward_kl,
    )

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    c, o = slice(0, logits.shape[0] // 2), slice(logits.shape[0] // 2, None)
    mask, ids = batch["mask"], batch["teacher_ids"]
    ce = token_cross_entropy(logits[c], batch["targets"][c], mask[c])
    if phase == "dckd":
        kl_c = topk_forward_kl(ids[c], batch["teacher_probs"][c], batch["teacher_rest"][c], logits[c], mask[c])
        kl_r = topk_forward_kl(ids[o], batch["teacher_probs"][o], batch["teacher_rest"][o], logits[o], mask[o])
        loss, parts = dckd_loss(ce, kl_c, kl_r, p.ce_weight, p.kl_weight), {"kl_chosen": kl_c, "kl_rejected": kl_r}
    else:
        adv = advantage(batch["teacher_probs"][o].clamp_min(1e-30).log(), batch["reference_logp"][o], p.advantage_clip)
        expected = adpa_term(logits[o], ids[o], adv, mask[o])
        loss, parts = adpa_loss(ce, expected, p.ce_weight, p.advantage_weight), {"expected_advantage": expected}
    return loss, {"ce_chosen": ce.item(), **{k: v.item() for k, v in parts.items()}}


def measure(model, examples: list[Example], phase: str, p: DictConfig, pad_id: int, device: str) -> dict:
    """The loss parts over the first MEASURED examples, without training (before / after a phase)."""
    import torch

    sums: dict[str, float] = {}
    examples = examples[:MEASURED]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), p.batch_size):
            chunk = examples[start: start + p.batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            for k, v in batch_loss(model, batch, phase, p)[1].items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk)
    model.train(was_training)
    return {k: round(v / len(examples), 4) for k, v in sums.items()}


def make_trainer(cfg: DictConfig, model, examples: list[Example], phase: str, pad_id: int, output_dir: Path,
                 device: str, report_to: list[str]):
    from transformers import Trainer, TrainingArguments

    p, o = cfg.pdistill, cfg.optimizer

    class PdistillTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.parts: dict[str, list[float]] = {}  # loss parts since the last log

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, parts = batch_loss(model, inputs, phase, p)
            for k, v in parts.items():
                self.parts.setdefault(k, []).append(v)
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self.parts.items() if v}}
            self.parts = {}
            super().log(logs, start_time)

    with setup_errors("pdistill", "pdistill"):
        # no step checkpoints: an interrupted phase starts again (the teacher passes before it are cached)
        args = TrainingArguments(output_dir=str(output_dir), save_strategy="no", remove_unused_columns=False,
                                 **trainer_arguments(cfg, p, device, report_to, gradient_checkpointing=False))
        trainer = PdistillTrainer(model=model, args=args, train_dataset=examples,
                                  data_collator=partial(collate, pad_id=pad_id))

    def line(head: str, logs: dict) -> str:
        return f"[pdistill] {phase} {head} " + " ".join(f"{k} {logs[k]:.4f}" for k in PARTS if k in logs)

    report_steps(trainer, step_callback(f"pdistill ({phase})", line, o.learning_rate))
    return trainer


def train(ctx: StageContext, s: Setup, examples: dict[str, list[Example]]) -> tuple[object, dict]:
    """The student after every phase of pdistill.loss, and per phase its steps, losses and before / after parts."""
    from tsalign.engines.models import load_causal_lm
    from tsalign.training.divergence import check_weights, largest_weight

    cfg, p = ctx.cfg, ctx.cfg.pdistill
    model = load_causal_lm(s.dirs["student"], "float32", s.device)  # fp32 master weights, as dpo's full training
    use_cache, model.config.use_cache = model.config.use_cache, False
    largest_before, counts = largest_weight(model), {}
    for phase in phases(p.loss):
        rows = examples[phase]
        if not rows:
            raise TsalignError(f"pdistill {phase}: no training rows (no answer fits pdistill.max_length="
                               f"{p.max_length}); raise it")
        before = measure(model, rows, phase, p, s.pad_id, s.device)
        trainer = make_trainer(cfg, model, rows, phase, s.pad_id, ctx.directory / "_work" / phase, s.device,
                               ctx.tracker.report_to)
        trainer.train()
        after = measure(model, rows, phase, p, s.pad_id, s.device)
        stats = log_stats(trainer.state.log_history)
        counts.update({f"{phase}_examples": len(rows), f"{phase}_steps": trainer.state.global_step,
                       f"{phase}_first_loss": stats["first_loss"], f"{phase}_last_loss": stats["last_loss"],
                       **{f"{phase}_{k}_before": v for k, v in before.items()},
                       **{f"{phase}_{k}_after": v for k, v in after.items()}})
        shown = ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before)
        say(f"[pdistill] {phase}: {len(rows)} examples, {trainer.state.global_step} steps; {shown}")
    model.config.use_cache = use_cache
    check_weights(model, "pdistill", "optimizer.learning_rate", cfg.optimizer.learning_rate, largest_before)
    return model, counts


def overall(trained: dict, names: list[str]) -> dict:
    """Steps and loss over the phases together (the summary's figures; each phase's are kept beside them)."""
    return {"steps": sum(trained.get(f"{n}_steps") or 0 for n in names),
            "first_loss": trained.get(f"{names[0]}_first_loss"), "last_loss": trained.get(f"{names[-1]}_last_loss")}
