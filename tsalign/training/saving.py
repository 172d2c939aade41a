"""A trained policy written once as a plain HF checkpoint (LoRA merged) + tokenizer, which generate loads.

    write_model(model, tokenizer, path)                  one process, whole weights (pdistill)
    save_policy(trainer, tokenizer, path, cfg, ...)      dpo under any launcher: DDP, DeepSpeed ZeRO-2/3, FSDP, LoRA

The weights are checked before anything is written (tsalign.training.divergence.check_weights): a diverged
policy is never saved.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from omegaconf import DictConfig

from tsalign import distributed
from tsalign.artifacts.store import atomic_dir, replace_dir
from tsalign.engines.models import load_causal_lm
from tsalign.training.divergence import check_weights


def write_model(model, tokenizer, path: Path) -> None:
    """The model and its tokenizer in `path`, atomically."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


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
    write_model(trained, tokenizer, path)
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
        write_model(trained, tokenizer, path)
