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
from tqdm.auto import tqdm

from tsalign.artifacts import PartialRows, atomic_write_jsonl, config_hash
from tsalign.models import pick_device
from tsalign.sampling import SamplingParams, make_sampler
from tsalign.stages.common import Plan, base_model_dir, policy_source, section, training_prompts, work_stamp
from tsalign.tracking import Tracker

CHUNK_PROMPTS = 8  # prompts per sampler call; finished chunks survive a crash


def plan(cfg: DictConfig) -> Plan:
    policy, label = policy_source(cfg, cfg.iteration)
    inputs = {"policy": policy} if policy else {}
    if cfg.data.source == "file" and cfg.data.path and Path(cfg.data.path).expanduser().exists():
        inputs["prompts"] = Path(cfg.data.path).expanduser()
    return Plan({**section(cfg, "policy", "sampler", "data", "generate", "seed"), "policy_used": label}, inputs)


def sampling_params(cfg: DictConfig, n: int, seed: int) -> SamplingParams:
    s = cfg.sampler
    return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                          max_prompt_tokens=s.max_prompt_tokens, seed=seed)


def open_sampler(cfg: DictConfig, model_dir: Path, seed: int):
    s = cfg.sampler
    device = pick_device(cfg.device)
    return make_sampler(s.backend, model_dir, dtype=cfg.policy.dtype, device=device, batch_size=s.batch_size,
                        seed=seed, **({} if s.backend == "hf" else dict(
                            tensor_parallel_size=s.tensor_parallel_size, max_model_len=s.max_model_len,
                            gpu_memory_utilization=s.gpu_memory_utilization, enforce_eager=s.enforce_eager)))


def derived_seed(*parts: int) -> int:
    """A seed per (run seed, iteration) or (run seed, chunk): distinct for shards of any size."""
    return int(config_hash(list(parts)), 16) % 2**31


def chunk_prompts(cfg: DictConfig, n: int) -> int:
    """Prompts per sampler call: at least one full hf batch of sequences, at least CHUNK_PROMPTS."""
    return max(CHUNK_PROMPTS, cfg.sampler.batch_size // n)


def sample_rows(sampler, prompts: list[dict], params: SamplingParams, partial: PartialRows, label: str,
                chunk_size: int = CHUNK_PROMPTS) -> list[dict]:
    """Sample every prompt not already in `partial`, chunk by chunk; rows come back in prompt order."""
    bar = tqdm(total=len(prompts), desc=f"sampling {label}", unit="prompt", disable=None)
    for start in range(0, len(prompts), chunk_size):
        chunk = [p for p in prompts[start : start + chunk_size] if p["prompt_id"] not in partial]
        bar.update(min(chunk_size, len(prompts) - start))
        if not chunk:
            continue
        chunk_params = SamplingParams(**{**params.as_dict(), "seed": derived_seed(params.seed, start)})
        completions = sampler.generate([p["messages"] for p in chunk], chunk_params)
        partial.extend([{
            "prompt_id": p["prompt_id"], "prompt": p["messages"], "policy": label,
            "candidates": [{"text": c.text, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
                            "empty": not c.text.strip(), "prompt_truncated": c.prompt_truncated} for c in comps],
        } for p, comps in zip(chunk, completions)])
    bar.close()
    return [partial.rows[p["prompt_id"]] for p in prompts]


def candidate_counts(rows: list[dict]) -> dict:
    cands = [c for r in rows for c in r["candidates"]]
    return {
        "prompts": len(rows), "candidates": len(cands),
        "empty": sum(c["empty"] for c in cands),
        "cut_at_max_new_tokens": sum(c["finish_reason"] == "length" for c in cands),
        "prompt_truncated": sum(c["prompt_truncated"] for c in cands),
        "generated_tokens": sum(c["num_tokens"] for c in cands),
    }


def run(cfg: DictConfig, out_dir: Path, tracker: Tracker) -> tuple[dict, dict, dict]:
    prompts = training_prompts(cfg, cfg.iteration)
    policy, label = policy_source(cfg, cfg.iteration)
    model_dir = policy or base_model_dir(cfg, cfg.policy)
    seed = derived_seed(cfg.seed, cfg.iteration)
    params = sampling_params(cfg, cfg.generate.num_candidates, seed)
    partial = PartialRows(out_dir / "_work" / "candidates.partial.jsonl", "prompt_id", work_stamp(cfg, "generate"))

    t0 = time.time()
    sampler = open_sampler(cfg, model_dir, seed)
    load_s = time.time() - t0
    t1 = time.time()
    try:
        rows = sample_rows(sampler, prompts, params, partial, label, chunk_prompts(cfg, params.n))
    finally:
        sampler.close()
    sample_s = time.time() - t1
    for r in rows:
        r["sampling"] = params.as_dict()
    out = atomic_write_jsonl(out_dir / "candidates.jsonl", rows)

    counts = candidate_counts(rows)
    counts.update(model_load_s=round(load_s, 2), sample_s=round(sample_s, 2),
                  tokens_per_s=round(counts["generated_tokens"] / max(sample_s, 1e-9), 1))
    tracker.log({f"generate/{k}": v for k, v in counts.items()})
    print(f"[generate] {counts['prompts']} prompts x K={params.n}: {counts['candidates']} candidates, "
          f"{counts['empty']} empty, {counts['cut_at_max_new_tokens']} cut at max_new_tokens, "
          f"{counts['tokens_per_s']} tok/s")
    return counts, {"candidates": out}, {"policy": label, "policy_dir": str(model_dir), "sampling": params.as_dict()}
