"""Sampling prompt by prompt-chunk into PartialRows, so a crash loses one chunk at most.

Used by generate (K candidates per prompt) and evaluate (one answer per held-out prompt).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from tsalign.artifacts import PartialRows, config_hash
from tsalign.sampling.base import SamplingParams

CHUNK_PROMPTS = 8  # prompts per sampler call; finished chunks survive a crash


def derived_seed(*parts: int) -> int:
    """A seed per (run seed, iteration) or (run seed, chunk): distinct for shards of any size."""
    return int(config_hash(list(parts)), 16) % 2**31


def chunk_prompts(batch_size: int, n: int) -> int:
    """Prompts per sampler call: at least one full hf batch of sequences, at least CHUNK_PROMPTS."""
    return max(CHUNK_PROMPTS, batch_size // n)


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
