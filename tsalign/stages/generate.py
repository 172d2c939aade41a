"""generate: the policy pi_t samples K candidate responses per prompt of iteration t's shard.

    tsalign stage=generate iteration=0 data.max_prompts=8
    tsalign stage=generate model=llama sampler=vllm          # GPU

Writes iter_<t>/generate/candidates.jsonl: one row per prompt with its K candidates as text, each
marked with its finish reason; empty and cut-off generations are kept and counted, never dropped.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from tsalign.artifacts import PartialRows, atomic_write_jsonl
from tsalign.engines import open_sampler, sampling_params
from tsalign.lineage import base_model_dir, policy_source, prompt_pool, training_prompts
from tsalign.sampling.resumable import chunk_prompts, derived_seed, sample_rows
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section


def plan(cfg: DictConfig) -> Plan:
    policy, label = policy_source(cfg, cfg.iteration)
    inputs = {"policy": policy} if policy else {}
    if cfg.data.source == "file" and cfg.data.path and Path(cfg.data.path).expanduser().exists():
        inputs["prompts"] = Path(cfg.data.path).expanduser()
    return Plan({**section(cfg, "policy", "sampler", "data", "generate", "seed"), "policy_used": label}, inputs)


def candidate_counts(rows: list[dict]) -> dict:
    cands = [c for r in rows for c in r["candidates"]]
    return {
        "prompts": len(rows), "candidates": len(cands),
        "empty": sum(c["empty"] for c in cands),
        "cut_at_max_new_tokens": sum(c["finish_reason"] == "length" for c in cands),
        "prompt_truncated": sum(c["prompt_truncated"] for c in cands),
        "generated_tokens": sum(c["num_tokens"] for c in cands),
    }


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    prompts = training_prompts(cfg, ctx.iteration)
    label = ctx.plan.config["policy_used"]
    model_dir = ctx.inputs.get("policy") or base_model_dir(cfg, cfg.policy)
    seed = derived_seed(cfg.seed, ctx.iteration)
    params = sampling_params(cfg, cfg.generate.num_candidates, seed)
    partial = PartialRows(ctx.directory / "_work" / "candidates.partial.jsonl", "prompt_id", ctx.stamp)

    t0 = time.time()
    sampler = open_sampler(cfg, model_dir, seed)
    load_s = time.time() - t0
    t1 = time.time()
    try:
        rows = sample_rows(sampler, prompts, params, partial, label, chunk_prompts(cfg.sampler.batch_size, params.n),
                           lambda done, tok_s: ctx.tracker.log({"generate/prompts_done": done, "generate/tok_s": tok_s}))
    finally:
        sampler.close()
    sample_s = time.time() - t1
    for r in rows:
        r["sampling"] = params.as_dict()
    out = atomic_write_jsonl(ctx.directory / "candidates.jsonl", rows)

    counts = candidate_counts(rows)
    counts["empty_prompts_skipped"] = prompt_pool(cfg)[1]
    counts.update(model_load_s=round(load_s, 2), sample_s=round(sample_s, 2),
                  tokens_per_s=round(counts["generated_tokens"] / max(sample_s, 1e-9), 1))
    ctx.tracker.log({f"generate/{k}": v for k, v in counts.items()})
    print(f"[generate] {counts['prompts']} prompts x K={params.n}: {counts['candidates']} candidates, "
          f"{counts['empty']} empty, {counts['cut_at_max_new_tokens']} cut at max_new_tokens, "
          f"{counts['tokens_per_s']} tok/s")
    return StageResult(counts, {"candidates": out},
                       {"policy": label, "policy_dir": str(model_dir), "sampling": params.as_dict()})


STAGE = Stage("generate", plan, run)
