"""Batched transformers generate: chat template, left padding, calls of prompts of similar length (batching.py), each
prompt prefilled once for its K samples; temperature + top-p drawn by tsalign.engines.sampling.nucleus (no vocabulary
sort per step), each sample from its own seeded generator (row_seed), so batching never changes the random draws
(float32 logits can differ in their last bits with a call's shape, which rarely moves a draw that falls at a
token's boundary, as in vLLM without batch-invariant kernels)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessorList

from tsalign.engines.models import load_causal_lm, load_tokenizer
from tsalign.engines.sampling.base import Completion, SamplingParams, chat_prompt_ids
from tsalign.engines.sampling.batching import CallCost, length_batches
from tsalign.engines.sampling.grouped_attention import use_grouped_attention
from tsalign.engines.sampling.nucleus import NucleusSampler


def row_seed(seed: int, prompt_index: int, n: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt_index` of a chunk (the vLLM sampler's request seed + sample)."""
    return (seed * 1_000_003 + prompt_index * n + sample) % 2**31


def call_cost(model) -> CallCost:
    """The time model of a generate call (batching.py) from the model's size and key/value shape; on a GPU a decode
    step costs about the same for any row count at these sizes, so the fewest calls win."""
    if model.device.type != "cpu":
        return CallCost(step_s=1.0, token_s=0.0, position_s=0.0)
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = model.dtype.itemsize
    return CallCost.of(model.num_parameters(), width, config.num_hidden_layers * 2 * kv_heads * head_dim * width)


class HFSampler:
    def __init__(self, model_dir: Path, dtype: str = "float32", device: str = "cpu", batch_size: int = 64):
        self.tokenizer = load_tokenizer(model_dir, padding_side="left", chat=True)
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device)
        use_grouped_attention(self.model)  # no key/value head copies per decode step on a CPU
        self.device = device
        self.batch_size = batch_size  # sequences per generate call at most; batching.py splits by expected time
        self.cost = call_cost(self.model)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | {self.tokenizer.eos_token_id} - {None}
        # drawn rows, and those whose nucleus reached past the top candidates (a full sort: nucleus.py)
        self.stats = {"generated_tokens": 0, "generate_s": 0.0, "drawn_rows": 0, "sorted_rows": 0}

    def _decode(self, row: list[int], truncated: bool) -> Completion:
        end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        kept = row if end is None else row[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Completion(text, "length" if end is None else "stop", len(kept), truncated)

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        return self.generate_chunks([(prompts, params)])[0]

    @torch.no_grad()
    def generate_chunks(self, chunks: list[tuple[list[list[dict]], SamplingParams]]) -> list[list[list[Completion]]]:
        """Several chunks (prompts, params that differ in the seed only) sampled together; each chunk's completions as
        generate() gives them. Sample j of prompt i of a chunk draws from its own generator (row_seed), as the vLLM
        sampler seeds each request: a prompt's draws do not depend on the prompts it shares a call with."""
        params = chunks[0][1]
        if any(replace(p, seed=0) != replace(params, seed=0) for _, p in chunks):
            raise ValueError("generate_chunks: the chunks' sampling params may differ in their seed only")
        sample = params.temperature > 0
        n = params.n if sample else 1  # greedy: one decode per prompt, copied K times
        jobs = [(chat_prompt_ids(self.tokenizer, m, params.max_prompt_tokens), [row_seed(p.seed, i, n, j) for j in range(n)])
                for prompts, p in chunks for i, m in enumerate(prompts)]
        results: list[list[Completion]] = [[] for _ in jobs]
        for call in length_batches([len(ids) for (ids, _), _ in jobs], n, self.batch_size, params.max_new_tokens,
                                   self.cost):
            batch = self.tokenizer.pad({"input_ids": [jobs[i][0][0] for i in call]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            cache = self._prompt_cache(batch, n)  # each prompt's prefill once, its key/values copied n times
            batch = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items()}
            # sampling is the last logits processor of a greedy decode (nucleus.py: no vocabulary sort per step)
            generators = [torch.Generator(self.device).manual_seed(s) for i in call for s in jobs[i][1]]
            draw = LogitsProcessorList([NucleusSampler(params.temperature, params.top_p, generators=generators)]
                                       if sample else [])
            t0 = time.perf_counter()
            out = self.model.generate(
                **batch, past_key_values=cache, do_sample=False, temperature=None, top_p=None, top_k=None,
                logits_processor=draw,
                max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            )
            self.stats["generate_s"] += time.perf_counter() - t0
            for sampler in draw:
                self.stats["drawn_rows"] += sampler.rows
                self.stats["sorted_rows"] += sampler.sorted_rows
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for j, i in enumerate(call):
                rows = new[j * n : (j + 1) * n] * (params.n // n)
                results[i] = [self._decode(r, jobs[i][0][1]) for r in rows]
                self.stats["generated_tokens"] += sum(c.num_tokens for c in results[i])
        out_chunks, start = [], 0
        for prompts, _ in chunks:
            out_chunks.append(results[start : start + len(prompts)])
            start += len(prompts)
        return out_chunks

    def _prompt_cache(self, batch: dict, n: int) -> DynamicCache | None:
        """The key/value cache of every prompt token but the last, computed once per prompt and repeated for its n
        samples; generate then prefills only the last token (its logits draw the first answer token). transformers
        would prefill each prompt n times (num_return_sequences expands the prompts first). None: nothing to share."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if n == 1 or ids.shape[1] < 2:
            return None
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: as generate numbers them
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return cache

    def close(self) -> None:
        del self.model
