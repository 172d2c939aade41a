"""Batched transformers generate: chat template, left padding, prompts sorted by length; temperature + top-p drawn
by tsalign.engines.sampling.nucleus (no vocabulary sort per step)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from tsalign.engines.models import load_causal_lm, load_tokenizer
from tsalign.engines.sampling.base import Completion, SamplingParams, chat_prompt_ids
from tsalign.engines.sampling.grouped_attention import use_grouped_attention
from tsalign.engines.sampling.nucleus import NucleusSampler


class HFSampler:
    def __init__(self, model_dir: Path, dtype: str = "float32", device: str = "cpu", batch_size: int = 16):
        self.tokenizer = load_tokenizer(model_dir, padding_side="left", chat=True)
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device)
        use_grouped_attention(self.model)  # no key/value head copies per decode step on a CPU
        self.device = device
        self.batch_size = batch_size
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

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        encoded = [chat_prompt_ids(self.tokenizer, m, params.max_prompt_tokens) for m in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))
        sample = params.temperature > 0
        n = params.n if sample else 1  # greedy: one decode per prompt, copied K times
        per_call = max(1, self.batch_size // n)  # prompts per generate() call
        results: list[list[Completion] | None] = [None] * len(prompts)
        chunks = [order[i : i + per_call] for i in range(0, len(order), per_call)]
        for chunk_no, chunk in enumerate(chunks):
            # each prompt n times, as transformers' num_return_sequences expands them before the prefill
            batch = self.tokenizer.pad({"input_ids": [encoded[i][0] for i in chunk for _ in range(n)]},
                                       return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            torch.manual_seed(params.seed * 100_003 + chunk_no)  # reproducible per run seed
            # sampling is the last logits processor of a greedy decode (nucleus.py: no vocabulary sort per step)
            draw = LogitsProcessorList([NucleusSampler(params.temperature, params.top_p)] if sample else [])
            t0 = time.perf_counter()
            out = self.model.generate(
                **batch, do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=draw,
                max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            )
            self.stats["generate_s"] += time.perf_counter() - t0
            for sampler in draw:
                self.stats["drawn_rows"] += sampler.rows
                self.stats["sorted_rows"] += sampler.sorted_rows
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for j, i in enumerate(chunk):
                rows = new[j * n : (j + 1) * n] * (params.n // n)
                results[i] = [self._decode(r, encoded[i][1]) for r in rows]
                self.stats["generated_tokens"] += sum(c.num_tokens for c in results[i])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
