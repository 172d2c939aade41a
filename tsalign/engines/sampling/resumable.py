"""Sampling prompt by prompt-chunk into PartialRows, so a crash loses one chunk at most.

Used by generate (K candidates per prompt) and evaluate (one answer per held-out prompt; pi_0's and the control's
in one pass: sample_runs).

Chunks are also the unit of seeding (chunk seed = derived_seed(run seed, chunk start)) and of data
parallelism: under `accelerate launch` generate's process r of N samples chunks r, r+N, r+2N, ...
(shard_ranges), so a prompt meets the same seed and the same batch whatever N is, and the merged
output of N processes is the output of one (same sampler, device type and dtype).

A sampler may take several chunks per call (a `prompts_per_call(n)` and a `generate_chunks` method: the vLLM
sampler on a GPU, whose engine batches continuously only over the requests of one call): the shard's
pending chunks then go to it in groups of at least that many prompts, each chunk with its own seed, and
each chunk's rows are kept once its call returns (a crash loses one call). Every other sampler gets one
chunk per call.
"""

from __future__ import annotations

import time

from tsalign.artifacts.store import PartialRows, config_hash
from tsalign.engines.sampling.base import SamplingParams
from tsalign.progress import progress

CHUNK_PROMPTS = 8  # prompts per sampler call; finished chunks survive a crash


def derived_seed(*parts: int) -> int:
    """A seed per (run seed, iteration) or (run seed, chunk): distinct for shards of any size."""
    return int(config_hash(list(parts)), 16) % 2**31


def chunk_prompts(batch_size: int, n: int) -> int:
    """Prompts per sampler call: at least one full hf batch of sequences, at least CHUNK_PROMPTS."""
    return max(CHUNK_PROMPTS, batch_size // n)


def shard_ranges(count: int, chunk_size: int, shard: int = 0, shards: int = 1) -> list[range]:
    """The prompt index ranges shard `shard` of `shards` samples: chunk j (prompts j*chunk_size ...)
    belongs to shard j % shards (strided, so shards differ by one chunk at most)."""
    starts = range(0, count, chunk_size)
    return [range(s, min(s + chunk_size, count)) for j, s in enumerate(starts) if j % shards == shard]


def shard_prompts(prompts: list[dict], chunk_size: int, shard: int = 0, shards: int = 1) -> list[dict]:
    return [prompts[i] for r in shard_ranges(len(prompts), chunk_size, shard, shards) for i in r]


def sample_rows(sampler, prompts: list[dict], params: SamplingParams, partial: PartialRows, label: str,
                chunk_size: int = CHUNK_PROMPTS, on_chunk=None, shard: int = 0, shards: int = 1) -> list[dict]:
    """Sample every prompt of the shard (all of them by default) not already in `partial`, chunk by
    chunk; the shard's rows come back in prompt order. Progress (prompts done, tokens/s, ETA) is shown
    per chunk, and passed to on_chunk(done, tok_s) (the tracker); resumed prompts count as done."""
    ranges = shard_ranges(len(prompts), chunk_size, shard, shards)
    mine = [prompts[i] for r in ranges for i in r]
    done = sum(p["prompt_id"] in partial for p in mine)
    where = f" (shard {shard + 1}/{shards})" if shards > 1 else ""
    pending = [(r, chunk) for r in ranges
               if (chunk := [p for p in prompts[r.start : r.stop] if p["prompt_id"] not in partial])]
    with progress(len(mine), f"sampling {label}{where}", "prompt", initial=done) as bar:
        for call in calls(pending, prompts_per_call(sampler, params.n)):
            t0 = time.monotonic()
            results = generate_chunks(sampler, [([p["messages"] for p in chunk], chunk_params(params, r))
                                                for r, chunk in call])
            for (_, chunk), completions in zip(call, results):
                keep_rows(partial, chunk, completions, label)
            tokens = sum(c.num_tokens for completions in results for comps in completions for c in comps)
            tok_s = round(tokens / max(time.monotonic() - t0, 1e-9), 1)
            sampled = sum(len(chunk) for _, chunk in call)
            bar.update(sampled, tok_s=tok_s)
            done += sampled
            if on_chunk:
                on_chunk(done, tok_s)
    return [partial.rows[p["prompt_id"]] for p in mine]


def sample_runs(sampler, prompts: list[dict], runs: list[tuple[SamplingParams, PartialRows]], label: str,
                chunk_size: int = CHUNK_PROMPTS) -> None:
    """Several runs over the same prompts (each its own params, e.g. another seed, and its own PartialRows) in one
    pass: chunk by chunk, every run's pending part of a chunk in one sampler call (generate_chunks), so the runs share
    the sampler's batches. Each chunk keeps its run's seed (chunk_params): the rows are those sample_rows gives run
    by run."""
    done = sum(p["prompt_id"] in partial for _, partial in runs for p in prompts)
    with progress(len(prompts) * len(runs), f"sampling {label}", "answer", initial=done) as bar:
        for r in shard_ranges(len(prompts), chunk_size):
            work = [(params, partial, chunk) for params, partial in runs
                    if (chunk := [p for p in prompts[r.start : r.stop] if p["prompt_id"] not in partial])]
            if not work:
                continue
            t0 = time.monotonic()
            results = generate_chunks(sampler, [([p["messages"] for p in chunk], chunk_params(params, r))
                                                for params, _, chunk in work])
            for (_, partial, chunk), completions in zip(work, results):
                keep_rows(partial, chunk, completions, label)
            tokens = sum(c.num_tokens for completions in results for comps in completions for c in comps)
            bar.update(sum(len(chunk) for _, _, chunk in work),
                       tok_s=round(tokens / max(time.monotonic() - t0, 1e-9), 1))


def chunk_params(params: SamplingParams, chunk: range) -> SamplingParams:
    """A chunk's own seed: derived from its first prompt's index, so it does not depend on who samples it."""
    return SamplingParams(**{**params.as_dict(), "seed": derived_seed(params.seed, chunk.start)})


def prompts_per_call(sampler, n: int) -> int:
    """The prompts the sampler wants per call at K=n; 0: one chunk per call."""
    wanted = getattr(sampler, "prompts_per_call", None)
    return wanted(n) if wanted and hasattr(sampler, "generate_chunks") else 0


def calls(pending: list[tuple[range, list]], size: int) -> list[list[tuple[range, list]]]:
    """Consecutive chunks grouped until a group holds at least `size` prompts (0: one chunk per group)."""
    groups, group, count = [], [], 0
    for r, chunk in pending:
        group.append((r, chunk))
        count += len(chunk)
        if count >= size:
            groups.append(group)
            group, count = [], 0
    return groups + [group] if group else groups


def generate_chunks(sampler, chunks: list[tuple[list, SamplingParams]]) -> list[list]:
    """Each chunk's completions: in one call if the sampler takes several chunks at once, else chunk by chunk."""
    if len(chunks) > 1:
        return sampler.generate_chunks(chunks)
    return [sampler.generate(messages, params) for messages, params in chunks]


def keep_rows(partial: PartialRows, chunk: list[dict], completions: list, label: str) -> None:
    partial.extend([{
            "prompt_id": p["prompt_id"], "prompt": p["messages"], "policy": label,
            "candidates": [{"text": c.text, "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
                            "empty": not c.text.strip(), "prompt_truncated": c.prompt_truncated} for c in comps],
        } for p, comps in zip(chunk, completions)])
