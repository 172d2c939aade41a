"""dpo: pi_{t+1} = DPO(pi_t; iteration t's preference pairs), with TRL's DPOTrainer.

    tsalign stage=dpo iteration=0
    tsalign stage=dpo iteration=1 dpo.reference=initial dpo.lora=true dpo.max_steps=20
    tsalign stage=dpo dpo.loss_type=dual_clip dpo.dual_clip=[-2,2] dpo.reference_refresh_steps=8   # TSO

Reads iter_<t>/rank/pairs.jsonl (TRL's conversational prompt/chosen/rejected) and pi_t (the base policy
at t=0, else iter_<t-1>/dpo/policy). Prompts too long for dpo.max_length lose their start, never the
response. The reference is pi_t (dpo.reference=previous; with LoRA, pi_t with the adapter disabled) or
pi_0 (initial); dpo.reference_refresh_steps=N replaces it by the current policy every N steps (TSO).
Step checkpoints in _work/checkpoints let an interrupted run resume where it stopped.
Writes iter_<t>/dpo/policy/: a plain HF checkpoint (LoRA merged) + tokenizer, which generate loads.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from tsalign import distributed
from tsalign.algorithms.pairs import fit_pair, to_trl_row
from tsalign.artifacts.store import config_hash, read_jsonl
from tsalign.config.choices import (
    DUAL_CLIP,  # TSO's dual-clip loss; every other loss_type is TRL's
    Reference,
)
from tsalign.engines.models import load_causal_lm, load_tokenizer, pick_device
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.checks import base_model, check_lengths, model_at
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.lineage import base_model_dir, finished_output, policy_source
from tsalign.training.divergence import largest_weight
from tsalign.training.dpo_trainer import trained_dtype
from tsalign.training.saving import save_policy
from tsalign.training.trainer import (
    checkpoint_step,
    fresh_checkpoints,
    log_stats,
    report_steps,
    setup_errors,
    step_callback,
    trainer_arguments,
)


def reference_label(cfg: DictConfig, policy_label: str) -> str:
    if cfg.dpo.reference == Reference.initial:
        return cfg.policy.name
    return f"{policy_label} (adapter disabled)" if cfg.dpo.lora else policy_label


def plan(cfg: DictConfig) -> Plan:
    pairs = finished_output(cfg, cfg.iteration, "rank", "pairs.jsonl", "dpo")
    policy, label = policy_source(cfg, cfg.iteration)
    config = {**section(cfg, "policy", "dpo", "optimizer", "seed"), "policy_used": label,
              "reference_used": reference_label(cfg, label)}
    for key in ("save_steps", "logging_steps"):  # bookkeeping: the trained policy does not depend on them
        del config["dpo"][key]
    return Plan(config, {"pairs": pairs, **({"policy": policy} if policy else {})})


def reference_model(cfg: DictConfig, policy_dir: Path) -> tuple[Path | None, str]:
    """(folder, dtype) of the reference model this stage loads, or (None, _) with LoRA, where the
    reference is the policy with its adapter disabled. Loaded here rather than left to TRL, which
    copies the trained policy's dtype: fp32 master weights would double the reference's memory
    (32 GB instead of 16 for an 8B policy in bf16)."""
    if cfg.dpo.lora:
        return None, str(cfg.policy.dtype)
    initial = cfg.dpo.reference == Reference.initial
    return (base_model_dir(cfg, cfg.policy) if initial else policy_dir), str(cfg.policy.dtype)


def check_fsdp_loading(cfg: DictConfig, environ=os.environ) -> None:
    """FSDP's cpu-RAM-efficient loading zero-fills every model transformers loads on local ranks > 0: accelerate
    restores the trained policy from rank 0, TRL's reference keeps its zeros (trl/models/utils.py prepare_fsdp),
    and the DPO loss is meaningless with no error. conf/accelerate/fsdp.yaml turns it off; a user's may not."""
    def on(key: str) -> bool:
        return environ.get(key, "").lower() == "true"

    if not cfg.dpo.lora and on("ACCELERATE_USE_FSDP") and on("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise TsalignError("fsdp_cpu_ram_efficient_loading: true leaves DPO's reference zero-filled on every process "
                           "but the first; set it to false in the accelerate config (conf/accelerate/fsdp.yaml does)")


def training_args(cfg: DictConfig, output_dir: Path, device: str, report_to: list[str]):
    from trl import DPOConfig

    d = cfg.dpo
    refresh = d.reference_refresh_steps  # values checked with the config (tsalign.config.schema.DpoConfig)
    loss_type = "sigmoid" if d.loss_type == DUAL_CLIP else d.loss_type  # dual clip clips TRL's sigmoid loss
    return DPOConfig(
        output_dir=str(output_dir), beta=d.beta, loss_type=[loss_type], max_length=d.max_length,
        sync_ref_model=refresh is not None, ref_model_sync_steps=refresh or 512, ref_model_mixup_alpha=1.0,
        save_strategy="steps", save_steps=d.save_steps, save_total_limit=2,
        **trainer_arguments(cfg, d, device, report_to),
    )


def make_trainer(cfg: DictConfig, model, ref_model, tokenizer, dataset, args):
    """The DPOTrainer of this stage (its own function so tests can inspect or wrap it)."""
    import datasets
    from trl import DPOTrainer

    trainer_class = DPOTrainer
    if cfg.dpo.loss_type == DUAL_CLIP:
        from tsalign.training.dpo_trainer import dual_clip_trainer

        trainer_class = dual_clip_trainer(*(float(x) for x in cfg.dpo.dual_clip))
    peft_config = None
    if cfg.dpo.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.dpo.lora_r, lora_alpha=cfg.dpo.lora_alpha, task_type="CAUSAL_LM",
                                 target_modules=list(cfg.dpo.lora_target_modules))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL tokenizes a few hundred rows: no bars for that
    try:
        trainer = trainer_class(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                                processing_class=tokenizer, peft_config=peft_config)
    finally:
        if bars:
            datasets.enable_progress_bars()
    report_steps(trainer, stage_callback(cfg.optimizer.learning_rate))
    return trainer


def step_line(head: str, logs: dict) -> str:
    return (f"[dpo] {head} acc {logs.get('rewards/accuracies', float('nan')):.2f} "
            f"margin {logs.get('rewards/margins', float('nan')):.4f}")


def stage_callback(learning_rate: float):
    """dpo's step lines (with the time left) and divergence stop (tsalign.training.trainer.step_callback)."""
    return step_callback("DPO", step_line, learning_rate, eta=True)


def run(ctx: StageContext) -> StageResult:
    from datasets import Dataset

    cfg, out_dir, tracker = ctx.cfg, ctx.directory, ctx.tracker
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # TRL's
    check_fsdp_loading(cfg)
    pairs_path = ctx.inputs["pairs"]
    pairs = read_jsonl(pairs_path, "preference pairs")
    if not pairs:
        raise TsalignError(f"no preference pairs in {pairs_path}; rank mined none: raise "
                           "generate.num_candidates, lower rank.tie_threshold or use more prompts "
                           "(data.prompts_per_iteration)")
    label = ctx.plan.config["policy_used"]
    model_dir = ctx.inputs.get("policy") or base_model_dir(cfg, cfg.policy)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(model_dir, chat=True)
    fitted = [fit_pair(tokenizer, to_trl_row(p), cfg.dpo.max_length) for p in pairs]
    dataset = Dataset.from_list([row for row, _ in fitted])

    ckpt_dir = out_dir / "_work" / "checkpoints"
    with setup_errors("DPO", "dpo"):  # a bad loss_type / optimizer / scheduler fails here, before any model loads
        args = training_args(cfg, ckpt_dir, device, tracker.report_to)
    t0 = time.time()
    model = load_causal_lm(model_dir, trained_dtype(cfg), device)
    largest_before = largest_weight(model)  # a weight blow-up is divergence too (tsalign.training.divergence)
    use_cache = model.config.use_cache  # Trainer turns it off for training; the saved policy gets it back
    ref_dir, ref_dtype = reference_model(cfg, model_dir)
    ref_model = load_causal_lm(ref_dir, ref_dtype, device) if ref_dir else None  # None: the adapter disabled
    load_s = time.time() - t0

    # the main process clears stale checkpoints; every process resumes from the same one
    resume = distributed.from_main(lambda: fresh_checkpoints(ckpt_dir, config_hash(ctx.stamp)))
    resumed_step = 0
    if resume:
        resumed_step = checkpoint_step(resume)
        say(f"[dpo] resuming from {resume} (step {resumed_step})")
    with setup_errors("DPO", "dpo"):
        trainer = make_trainer(cfg, model, ref_model, tokenizer, dataset, args)
    t1 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t1

    save_policy(trainer, tokenizer, out_dir / "policy", cfg, use_cache, largest_before, model_dir)

    steps = trainer.state.global_step
    stats = log_stats(trainer.state.log_history, reward_accuracy_mean="rewards/accuracies",
                      reward_margin_mean="rewards/margins")
    if stats["train_loss"] is None:  # nothing logged: the mean over this invocation's steps
        stats["train_loss"] = round(result.training_loss, 4)
    counts = {
        "pairs": len(pairs), "trained_pairs": len(trainer.train_dataset),
        "prompts_cut": sum(c["prompt_cut"] for _, c in fitted),
        "responses_cut": sum(c["response_cut"] for _, c in fitted),
        "steps": steps, "resumed_from_step": resumed_step, **stats,
        "model_load_s": round(load_s, 2), "train_s": round(train_s, 2),
        "s_per_step": round(train_s / max(steps - resumed_step, 1), 3),
    }
    tracker.log({f"dpo/{k}": v for k, v in counts.items() if v is not None})
    say(f"[dpo] {counts['pairs']} pairs ({counts['prompts_cut']} prompts cut, {counts['responses_cut']} "
          f"responses cut), {steps} steps, loss {counts['first_loss']} -> {counts['last_loss']}, "
          f"{counts['s_per_step']} s/step")
    extra = {"policy": label, "policy_dir": str(model_dir), "reference": str(cfg.dpo.reference),
             "reference_model": ctx.plan.config["reference_used"], "reference_dir": str(ref_dir or model_dir),
             "reference_dtype": str(ref_model.dtype).removeprefix("torch.") if ref_model is not None else None,
             "lora": cfg.dpo.lora, "device": device}
    return StageResult(counts, {"policy": out_dir / "policy"}, extra)


def check(cfg: DictConfig) -> None:
    lengths = {"dpo.max_length": cfg.dpo.max_length}
    check_lengths(model_at(cfg, "policy", policy_source(cfg, cfg.iteration)[0]), lengths)
    if cfg.dpo.reference == Reference.initial:
        check_lengths(base_model(cfg, "policy"), lengths)


STAGE = Stage("dpo", plan, run, check)
