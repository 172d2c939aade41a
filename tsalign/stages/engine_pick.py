"""The engines a run computes with, picked for this machine: torch's threads (the CPUs no other process keeps busy)
and, for sampler=auto, the sampling engine.

sampler=auto on a config: the engine of tsalign.engines.engine_choice written into cfg.sampler (backend, dtype)
before a stage plans, so every reader of the config (checks, the plan, generate, evaluate) sees the engine that runs.

    tsalign stage=generate sampler=auto      # make run's default; the choice and why are printed and in the manifest

The calibration runs once per (machine, model, engine versions), under a lock (a sweep's jobs wait for one), on the
first prompts of the pool with the base policy; delete <cache>/engine_choice/ to measure again.
"""

from __future__ import annotations

import importlib.util
import json
import os

from omegaconf import DictConfig

from tsalign.artifacts.locks import build_once
from tsalign.artifacts.store import atomic_write_json
from tsalign.engines.engine_choice import (
    CALIBRATION,
    Choice,
    Work,
    calibration_file,
    calibration_key,
    choose,
    engine_versions,
    measure,
    read_calibration,
    vllm_dtype,
)
from tsalign.engines.machine import machine
from tsalign.progress import say
from tsalign.stages.lineage import base_model_dir, prompt_pool

CHOSEN: dict[str, Choice] = {}  # this process's choice, for generate's manifest


def planned_work(cfg: DictConfig) -> Work:
    """An iteration's sampling, as its first one does it (every stage of a loop then picks the same engine): generate
    (one engine, K answers per prompt) and evaluate (the base policy's engine for its answers and the control's, the
    new policy's for its own)."""
    d, prompts = cfg.data, cfg.data.prompts_per_iteration
    if d.max_prompts:
        prompts = min(prompts, d.max_prompts)
    answer_sets = 3 if cfg.evaluate.control else 2
    return Work(starts=3, tokens=(prompts * cfg.generate.num_candidates + answer_sets * d.eval_prompts)
                * cfg.sampler.max_new_tokens)


def with_engine(cfg: DictConfig, backend: str, dtype: str | None) -> DictConfig:
    """cfg with another sampler engine: the calibration measures each engine with the stage's own engine options."""
    other = cfg.copy()
    other.sampler.backend, other.sampler.dtype = backend, dtype
    return other


def calibrate(cfg: DictConfig, isa: list[str]) -> dict:
    """hf and vLLM (in the dtype the CPU computes natively) on the pool's first prompts with the base policy."""
    from tsalign.engines.sampling import SamplingParams
    from tsalign.stages.factory import open_sampler

    model_dir, dtype = base_model_dir(cfg, cfg.policy), vllm_dtype(isa)
    prompts = [p["messages"] for p in prompt_pool(cfg)[0][: CALIBRATION["prompts"]]]
    params = SamplingParams(n=CALIBRATION["k"], max_new_tokens=CALIBRATION["max_new_tokens"], seed=0,
                            max_prompt_tokens=cfg.sampler.max_prompt_tokens)
    say(f"[tsalign] sampler=auto: measuring hf and vLLM ({dtype}) on {len(prompts)} prompts, once for this machine")
    hf = measure(lambda: open_sampler(with_engine(cfg, "hf", None), model_dir, 0), prompts, params)
    vllm = measure(lambda: open_sampler(with_engine(cfg, "vllm", dtype), model_dir, 0), prompts, params)
    return {"hf": hf, "vllm": vllm, "vllm_dtype": dtype, "sizes": CALIBRATION}


def measured_choice_input(cfg: DictConfig, record: dict) -> dict:
    """The calibration of this machine, model and engine versions: read from the cache, else measured and saved."""
    path = calibration_file(cfg.paths.cache, record)
    key = calibration_key(cfg.policy.name, engine_versions())

    def save() -> None:
        old = json.loads(path.read_text()) if path.is_file() else {}
        entries = {**old.get("entries", {}), key: calibrate(cfg, record["isa"])}
        atomic_write_json(path, {"machine": record, "entries": entries})

    build_once(path, lambda: read_calibration(path, key) is not None, save, "engine calibration")
    return read_calibration(path, key)


def resolve_auto_sampler(cfg: DictConfig) -> Choice | None:
    """Replace sampler.backend=auto (and its dtype) by the chosen engine; None when the config names one."""
    if str(cfg.sampler.backend) != "auto":
        return None
    from tsalign.engines.models import pick_device

    record = machine()
    installed, gpu = importlib.util.find_spec("vllm") is not None, pick_device(cfg.device) == "cuda"
    measured = measured_choice_input(cfg, record) if installed and not gpu and cfg.sampler.calibrate else None
    choice = choose(record["isa"], installed, gpu, str(cfg.policy.dtype), planned_work(cfg), measured)
    cfg.sampler.backend = choice.backend
    cfg.sampler.dtype = choice.dtype if choice.backend == "vllm" else None
    CHOSEN["sampler"] = choice
    say(f"[tsalign] sampler=auto -> {choice.backend} ({choice.dtype}): {choice.why}")
    return choice


# stage= values that sample, or plan what samples: they resolve sampler=auto
SAMPLING = ("generate", "evaluate", "pdistill", "loop", "plan")


def set_threads(cfg: DictConfig) -> None:
    """torch's CPU threads: `threads=N`, else the CPUs no other process keeps busy now (all of them on a quiet machine).
    vLLM-CPU's worker keeps its own binding (VLLM_CPU_OMP_THREADS_BIND): binding it to every CPU was faster alone on 2
    CPUs (251 against 188 tok/s) but fell to 0.55x beside a busy process (auto: 0.86x), so it is left to the user."""
    if str(cfg.stage) in ("status", "report"):  # views: no torch, nothing to compute, no time to measure
        return
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return
    from tsalign.engines.machine import busy_cpus, threads_for

    cpus = sorted(os.sched_getaffinity(0))
    busy = busy_cpus(cpus)
    n = threads_for(len(cpus), busy)
    if n < len(cpus):
        print(f"[tsalign] threads: {n} of {len(cpus)} CPUs (other processes keep {busy:.1f} busy: a thread sharing a "
              "core stalls the others; threads=N sets it)")
    torch.set_num_threads(n)
