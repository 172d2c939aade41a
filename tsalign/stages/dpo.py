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

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from tsalign import distributed
from tsalign.algorithms.pairs import fit_pair, to_trl_row
from tsalign.artifacts.store import atomic_dir, atomic_write_text, config_hash, read_jsonl, replace_dir
from tsalign.config.choices import Reference
from tsalign.engines.models import load_causal_lm, load_tokenizer, pick_device
from tsalign.errors import TsalignError
from tsalign.stages.checks import base_model, check_lengths, model_at
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.lineage import base_model_dir, finished_output, policy_source
from tsalign.training.divergence import check_weights, diverged, divergence, largest_weight
from tsalign.training.dpo_trainer import trained_dtype

DUAL_CLIP = "dual_clip"  # TSO's dual-clip loss (tsalign/training/dpo_trainer.py); every other loss_type is TRL's


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
    import torch
    from trl import DPOConfig

    d, o = cfg.dpo, cfg.optimizer
    gpu = device.startswith("cuda")
    if not 0 <= o.warmup_ratio < 1:
        raise TsalignError(f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    refresh = d.reference_refresh_steps
    if refresh is not None and (refresh < 1 or d.lora):
        raise TsalignError(f"dpo.reference_refresh_steps={refresh}: needs a whole number >= 1 and full "
                           "fine-tuning (dpo.lora=false; with LoRA there is no separate reference to refresh)")
    if d.loss_type == DUAL_CLIP and not (len(d.dual_clip) == 2 and d.dual_clip[0] < d.dual_clip[1]):
        raise TsalignError(f"dpo.dual_clip={list(d.dual_clip)} must be [low, high] with low < high")
    loss_type = "sigmoid" if d.loss_type == DUAL_CLIP else d.loss_type  # dual clip clips TRL's sigmoid loss
    return DPOConfig(
        output_dir=str(output_dir), beta=d.beta, loss_type=[loss_type], max_length=d.max_length,
        sync_ref_model=refresh is not None, ref_model_sync_steps=refresh or 512, ref_model_mixup_alpha=1.0,
        num_train_epochs=d.epochs, max_steps=d.max_steps, per_device_train_batch_size=d.batch_size,
        gradient_accumulation_steps=d.gradient_accumulation_steps, learning_rate=o.learning_rate,
        lr_scheduler_type=o.lr_scheduler_type, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        warmup_steps=o.warmup_ratio,  # transformers 5 has no warmup_ratio: a float below 1 is a ratio
        optim=o.name, logging_steps=d.logging_steps, seed=cfg.seed,
        save_strategy="steps", save_steps=d.save_steps, save_total_limit=2, report_to=report_to,
        use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(), gradient_checkpointing=gpu,
        disable_tqdm=True,
    )


@contextlib.contextmanager
def trl_errors():
    """TRL / transformers reject bad settings with ValueError deep inside; say it in one line."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TsalignError(f"DPO setup rejected the config (dpo.* / optimizer.*): {first}") from None


def make_trainer(cfg: DictConfig, model, ref_model, tokenizer, dataset, args):
    """The DPOTrainer of this stage (its own function so tests can inspect or wrap it)."""
    import datasets
    from transformers import PrinterCallback
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
    trainer.remove_callback(PrinterCallback)  # one short line per log instead of the full dict
    trainer.add_callback(stage_callback(cfg.optimizer.learning_rate))
    return trainer


def stage_callback(learning_rate: float):
    """One short line per logged step; no checkpoint after the last step, where the policy is saved
    next anyway (a full-model + optimizer checkpoint costs ~14 s and 1.6 GB for SmolLM2-135M); and a
    diverging run (tsalign.training.divergence) stops at the step that shows it, before any checkpoint of it
    is saved (Trainer logs before it saves), with an error naming optimizer.learning_rate."""
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.monotonic(), state.global_step  # a resumed run starts later

        def eta(self, state) -> str:
            done = state.global_step - self.first_step
            if done <= 0:
                return ""
            per_step = (time.monotonic() - self.started) / done
            return f", {per_step:.1f} s/step, ETA {per_step * (state.max_steps - state.global_step):.0f} s"

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            first = next((h["loss"] for h in state.log_history if "loss" in h), None)
            reason = divergence(logs or {}, first)
            if reason:
                raise diverged("DPO", f"at step {state.global_step}/{state.max_steps}", reason,
                               "optimizer.learning_rate", learning_rate)
            if logs and "loss" in logs:
                print(f"[dpo] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                      f"acc {logs.get('rewards/accuracies', float('nan')):.2f} "
                      f"margin {logs.get('rewards/margins', float('nan')):.4f}{self.eta(state)}", flush=True)

    return StageCallback()


def fresh_checkpoints(directory: Path, stamp: str) -> Path | None:
    """The latest step checkpoint made under this exact config and input; stale ones are deleted."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp_file = directory.parent / "checkpoints.config"
    if not stamp_file.is_file() or stamp_file.read_text() != stamp:
        shutil.rmtree(directory, ignore_errors=True)
        atomic_write_text(stamp_file, stamp)
    while directory.is_dir() and (last := get_last_checkpoint(str(directory))):
        try:  # Trainer writes trainer_state.json last: without a readable one the save was cut by a crash
            json.loads((Path(last) / "trainer_state.json").read_text())
            return last
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(last, ignore_errors=True)
    return None


def log_stats(history: list[dict]) -> dict:
    """Means over the logged steps (a resumed run's history includes the steps before the crash)."""
    steps = [h for h in history if "loss" in h]

    def mean(key: str) -> float | None:
        return round(sum(h[key] for h in steps) / len(steps), 4) if steps and key in steps[0] else None

    return {"train_loss": mean("loss"), "first_loss": round(steps[0]["loss"], 4) if steps else None,
            "last_loss": round(steps[-1]["loss"], 4) if steps else None,
            "reward_accuracy_mean": mean("rewards/accuracies"), "reward_margin_mean": mean("rewards/margins")}


def params_sharded(trainer) -> bool:
    """Each process holds a slice of every weight: DeepSpeed ZeRO-3 (outside GatheredParameters a partitioned
    parameter is an empty tensor) or FSDP (DTensor shards). ZeRO-2 keeps whole weights on every process."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return getattr(trainer, "is_fsdp_enabled", False) or (
        getattr(trainer, "is_deepspeed_enabled", False) and is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def outside_zero3():
    """from_pretrained as in a plain process: while the trainer's DeepSpeed config is registered, transformers
    builds every model under deepspeed.zero.Init, a collective the other processes are not in."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def merge_saved_adapter(adapter: Path, base_dir: Path, tokenizer, path: Path, cfg: DictConfig, use_cache: bool,
                        largest_before: float) -> None:
    """The LoRA adapter Trainer.save_model gathered, merged into a fresh CPU copy of the base (main process only)."""
    from peft import PeftModel

    with outside_zero3():
        base = load_causal_lm(base_dir, cfg.policy.dtype, "cpu")
        trained = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    trained.config.use_cache = use_cache
    check_weights(trained, "DPO", "optimizer.learning_rate", cfg.optimizer.learning_rate, largest_before)
    with atomic_dir(path) as tmp:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(adapter, ignore_errors=True)


def save_policy(trainer, tokenizer, path: Path, cfg: DictConfig, use_cache: bool, largest_before: float,
                base_dir: Path) -> None:
    """pi_{t+1} as a plain HF checkpoint (LoRA merged), written once. Sharded weights (DeepSpeed ZeRO-3,
    FSDP) are gathered by Trainer.save_model, which every process must call; the main process writes.
    A LoRA adapter trained on sharded weights is gathered the same way and merged into the base loaded
    afresh: merging in place would add into empty ZeRO-3 partitions (a checkpoint of shape-[0] tensors)
    or write FSDP's DTensors from the main process alone (save_pretrained fails on them)."""
    sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
    if sharded and (not cfg.dpo.lora or params_sharded(trainer)):
        staging = path.with_name(f".{path.name}.sharded.tmp")  # the same name on every process
        trainer.save_model(str(staging))  # LoRA: the adapter only
        distributed.barrier()
        if distributed.is_main() and cfg.dpo.lora:
            merge_saved_adapter(staging, base_dir, tokenizer, path, cfg, use_cache, largest_before)
        elif distributed.is_main():
            tokenizer.save_pretrained(staging)
            replace_dir(staging, path)
        return
    trained = trainer.model.merge_and_unload() if cfg.dpo.lora else trainer.model
    trained.config.use_cache = use_cache
    check_weights(trained, "DPO", "optimizer.learning_rate", cfg.optimizer.learning_rate, largest_before)
    if distributed.is_main():  # DDP replicas are identical: one writes
        with atomic_dir(path) as tmp:
            trained.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


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
    with trl_errors():  # a bad loss_type / optimizer / scheduler fails here, before any model loads
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
        resumed_step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"[dpo] resuming from {resume} (step {resumed_step})")
    with trl_errors():
        trainer = make_trainer(cfg, model, ref_model, tokenizer, dataset, args)
    t1 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.time() - t1

    save_policy(trainer, tokenizer, out_dir / "policy", cfg, use_cache, largest_before, model_dir)

    steps = trainer.state.global_step
    stats = log_stats(trainer.state.log_history)
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
    print(f"[dpo] {counts['pairs']} pairs ({counts['prompts_cut']} prompts cut, {counts['responses_cut']} "
          f"responses cut), {steps} steps, loss {counts['first_loss']} -> {counts['last_loss']}, "
          f"{counts['s_per_step']} s/step")
    extra = {"policy": label, "policy_dir": str(model_dir), "reference": str(cfg.dpo.reference),
             "reference_model": reference_label(cfg, label), "reference_dir": str(ref_dir or model_dir),
             "reference_dtype": str(ref_model.dtype).removeprefix("torch.") if ref_model is not None else None,
             "lora": cfg.dpo.lora, "device": device}
    return StageResult(counts, {"policy": out_dir / "policy"}, extra)


def check(cfg: DictConfig) -> None:
    lengths = {"dpo.max_length": cfg.dpo.max_length}
    check_lengths(model_at(cfg, "policy", policy_source(cfg, cfg.iteration)[0]), lengths)
    if cfg.dpo.reference == Reference.initial:
        check_lengths(base_model(cfg, "policy"), lengths)


STAGE = Stage("dpo", plan, run, check)
