"""generate: the policy pi_t samples K candidate responses per prompt of iteration t's shard.

    tsalign stage=generate iteration=0 data.max_prompts=8
    tsalign stage=generate model=llama sampler=vllm          # GPU

Writes iter_<t>/generate/candidates.jsonl: one row per prompt with its K candidates as text, each
marked with its finish reason; empty and cut-off generations are kept and counted, never dropped.

Data-parallel generation (one engine per process; each process keeps its own sampler.tensor_parallel_size):

    accelerate launch --multi_gpu --num_processes 2 -m tsalign.cli stage=generate iteration=0
    tsalign stage=loop launch.generate_processes=2        # the loop launches generate like that

Process r of N samples prompt chunks r, r+N, ... (tsalign.engines.sampling.resumable.shard_ranges) on its own
device (cuda:LOCAL_RANK; a vLLM engine on GPUs LOCAL_RANK*tp ...) into its own resumable file,
_work/candidates.shard<r>of<N>.partial.jsonl (bound to the config, the inputs and N: a rerun with the
same N samples only what each shard is missing). Chunks carry their seeds, so the merged output is
the one-process output. The main process merges the shards in prompt order into candidates.jsonl
and writes the one manifest. A shard that finishes first waits for the others on a gloo group with a long
timeout (on_every_shard): accelerate's default process group gives up after torch's default, 10 minutes on NCCL.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import timedelta
from pathlib import Path

from omegaconf import DictConfig

from tsalign import distributed
from tsalign.artifacts.store import PartialRows, atomic_write_jsonl
from tsalign.engines.machine import machine, machine_line
from tsalign.engines.sampling.resumable import chunk_prompts, derived_seed, sample_rows, shard_prompts
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.checks import check_sampler, model_at
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.engine_pick import CHOSEN
from tsalign.stages.factory import open_sampler, sampling_params
from tsalign.stages.lineage import base_model_dir, policy_source, prompt_pool, training_prompts
from tsalign.stages.matrix import add_candidates, add_references, matrix_models
from tsalign.stages.matrix import model_dir as model_dir_of


def plan(cfg: DictConfig) -> Plan:
    policy, label = policy_source(cfg, cfg.iteration)
    inputs = {"policy": policy} if policy else {}
    inputs.update({f"matrix_{m.label}": m.directory for m in matrix_models(cfg, cfg.iteration) if m.directory})
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


def shard_work(directory: Path, stamp: dict, shard: int, shards: int, name: str = "candidates") -> PartialRows:
    """The finished prompts of shard `shard` of `shards` (of one source); one process keeps the one-file layout."""
    if shards == 1:
        return PartialRows(directory / "_work" / f"{name}.partial.jsonl", "prompt_id", stamp)
    return PartialRows(directory / "_work" / f"{name}.shard{shard}of{shards}.partial.jsonl", "prompt_id",
                       {**stamp, "shard": [shard, shards]})


def merged_rows(prompts: list[dict], directory: Path, stamp: dict, shards: int, name: str = "candidates") -> list[dict]:
    """Every shard's rows, in prompt order."""
    rows: dict[str, dict] = {}
    for r in range(shards):
        rows.update(shard_work(directory, stamp, r, shards, name).rows)
    missing = [p["prompt_id"] for p in prompts if p["prompt_id"] not in rows]
    if missing:
        raise TsalignError(f"generate: {len(missing)} prompts missing from the shards' work in {directory / '_work'} "
                           f"(first: {missing[0]}); rerun the same command to sample them")
    return [rows[p["prompt_id"]] for p in prompts]


SHARD_WAIT = timedelta(days=1)  # how long a finished shard waits for the slowest one


@functools.lru_cache(maxsize=1)
def shard_wait_group():
    """A gloo group whose collectives wait up to SHARD_WAIT. Shards finish minutes to hours apart (one chunk
    more, a slower engine start, a shard resumed with nothing left to sample), while accelerate creates the
    default group with torch's default timeout: 10 minutes on NCCL, after which its watchdog tears the
    waiting process down. Created by every process at the same point (a collective), before any samples."""
    import torch.distributed as dist

    distributed.state()
    return dist.new_group(backend="gloo", timeout=SHARD_WAIT)


def on_every_shard(compute) -> list:
    """distributed.on_every_process(compute), the wait for the slowest shard done on shard_wait_group: every
    process gets every result by rank, or the lowest rank's error, once all have finished their own share."""
    if not distributed.launched():
        return [compute()]
    import torch.distributed as dist

    try:
        outcome = (True, compute())
    except Exception as e:  # noqa: BLE001 -- re-raised on every process by on_every_process below
        outcome = (False, e)
    dist.barrier(group=shard_wait_group())
    return distributed.on_every_process(lambda: _unwrap(outcome))


def _unwrap(outcome: tuple):
    ok, value = outcome
    if not ok:
        raise value
    return value


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    prompts = training_prompts(cfg, ctx.iteration)
    label = ctx.plan.config["policy_used"]
    model_dir = ctx.inputs.get("policy") or base_model_dir(cfg, cfg.policy)
    seed = derived_seed(cfg.seed, ctx.iteration)
    params = sampling_params(cfg, cfg.generate.num_candidates, seed)
    shard, shards = distributed.rank(), distributed.world_size()
    if shards > 1:
        shard_wait_group()  # every process is here together: none has started sampling

    def sample_shard(name: str, directory: Path, who: str, params) -> dict:
        size = chunk_prompts(cfg.sampler.batch_size, params.n)
        partial = shard_work(ctx.directory, ctx.stamp, shard, shards, name)
        mine = shard_prompts(prompts, size, shard, shards)
        todo = sum(p["prompt_id"] not in partial for p in mine)
        stats = {"shard": shard, "prompts": len(mine), "sampled": todo, "model_load_s": 0.0, "sample_s": 0.0}
        if not todo:
            return stats  # this shard finished in an earlier attempt: no model loaded
        t0 = time.time()
        sampler = open_sampler(cfg, directory, params.seed)
        t1 = time.time()
        try:
            sample_rows(sampler, prompts, params, partial, who, size,
                        lambda done, tok_s: ctx.tracker.log({"generate/prompts_done": done, "generate/tok_s": tok_s}),
                        shard=shard, shards=shards)
            t2 = time.time()  # sampling ends here: shutting a vLLM engine down takes seconds, timed apart
        finally:
            closing = time.time()
            sampler.close()
        return {**stats, "model_load_s": round(t1 - t0, 2), "sample_s": round(t2 - t1, 2),
                "close_s": round(time.time() - closing, 2)}

    # pi_t's K answers, then each model of TSO's matrix (its own seed and work file); an error in any
    # shard stops every process
    matrix = [(f"candidates.{m.name.replace('/', '_')}", model_dir_of(cfg, m), m.label,
               sampling_params(cfg, cfg.generate.matrix_candidates, seed + 1 + j))
              for j, m in enumerate(matrix_models(cfg, ctx.iteration))]
    sources = [("candidates", model_dir, label, params), *matrix]
    per_shard = [on_every_shard(lambda src=src: sample_shard(*src)) for src in sources]
    if not distributed.is_main():
        return StageResult({}, {})  # the main process merges and writes
    rows = merged_rows(prompts, ctx.directory, ctx.stamp, shards)
    for name, _, who, _ in matrix:
        add_candidates(rows, merged_rows(prompts, ctx.directory, ctx.stamp, shards, name), who)
    references = add_references(rows, prompts) if cfg.generate.references else 0
    for r in rows:
        r["sampling"] = params.as_dict()
    out = atomic_write_jsonl(ctx.directory / "candidates.jsonl", rows)

    counts = candidate_counts(rows)
    counts["empty_prompts_skipped"] = prompt_pool(cfg)[1]
    if matrix or cfg.generate.references:
        counts.update(matrix_candidates=sum(len(r["candidates"]) - params.n for r in rows) - references,
                      reference_candidates=references)
    flat = [s for shards_of_source in per_shard for s in shards_of_source]
    load_s, sample_s = max(s["model_load_s"] for s in flat), sum(max(s["sample_s"] for s in p) for p in per_shard)
    # null when every prompt was sampled by an earlier attempt (nothing timed in this one)
    close_s = round(sum(max(s.get("close_s", 0.0) for s in p) for p in per_shard), 2)
    counts.update(processes=shards, model_load_s=load_s, sample_s=round(sample_s, 2), close_s=close_s,
                  tokens_per_s=round(counts["generated_tokens"] / sample_s, 1) if sample_s else None,
                  engine=str(cfg.sampler.backend), engine_dtype=str(cfg.sampler.dtype or cfg.policy.dtype)
                  if cfg.sampler.backend == "vllm" else str(cfg.policy.dtype), machine=machine(engine_threads(cfg)))
    ctx.tracker.log({f"generate/{k}": v for k, v in counts.items()})
    say(f"[generate] {counts['prompts']} prompts x K={params.n}: {counts['candidates']} candidates, "
          f"{counts['empty']} empty, {counts['cut_at_max_new_tokens']} cut at max_new_tokens, "
          f"{counts['tokens_per_s']} tok/s ({counts['engine']}, {counts['engine_dtype']}; {machine_line(counts['machine'])})"
          + (f" over {shards} processes" if shards > 1 else "")
          + (f"; model matrix {[m[2] for m in matrix]}, {references} reference answers" if counts.get("matrix_candidates")
             is not None else ""))
    extra = {"policy": label, "policy_dir": str(model_dir), "sampling": params.as_dict()}
    if "sampler" in CHOSEN:  # sampler=auto: why this engine
        extra["engine_choice"] = CHOSEN["sampler"].why
    if shards > 1:
        extra["shards"] = per_shard[0]
    if matrix:
        extra["matrix"] = {who: str(directory) for _, directory, who, _ in matrix}
    return StageResult(counts, {"candidates": out}, extra)


def engine_threads(cfg: DictConfig) -> int | str | None:
    """The compute threads of the sampler: torch's (hf; None: read from torch), or vLLM-CPU's worker binding."""
    if cfg.sampler.backend != "vllm":
        return None
    return "VLLM_CPU_OMP_THREADS_BIND=" + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")


def check(cfg: DictConfig) -> None:
    check_sampler(cfg)
    model_at(cfg, "policy", policy_source(cfg, cfg.iteration)[0])
    training_prompts(cfg, cfg.iteration)
    if cfg.generate.num_candidates < 2:
        say(f"[tsalign] note: generate.num_candidates={cfg.generate.num_candidates}: rank needs at least 2 "
              "candidates per prompt to make a pair")


STAGE = Stage("generate", plan, run, check)
