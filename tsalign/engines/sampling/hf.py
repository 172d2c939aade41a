"""Batched transformers generate: chat template, left padding, prompts sorted by length."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tsalign.engines.models import load_causal_lm, load_tokenizer
from tsalign.engines.sampling.base import Completion, SamplingParams, chat_prompt_ids
from tsalign.engines.sampling.grouped_attention import use_grouped_attention


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
        self.stats = {"generated_tokens": 0, "generate_s": 0.0}

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
        n = params.n if sample else 1  # greedy: one decode per prompt, copied K times (transformers refuses K>1)
        per_call = max(1, self.batch_size // n)  # prompts per generate() call
        results: list[list[Completion] | None] = [None] * len(prompts)
        chunks = [order[i : i + per_call] for i in range(0, len(order), per_call)]
        for chunk_no, chunk in enumerate(chunks):
            batch = self.tokenizer.pad({"input_ids": [encoded[i][0] for i in chunk]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            torch.manual_seed(params.seed * 100_003 + chunk_no)  # reproducible per run seed
            t0 = time.perf_counter()
            out = self.model.generate(
                **batch, do_sample=sample, temperature=params.temperature if sample else None,
                top_p=params.top_p if sample else None, top_k=None, max_new_tokens=params.max_new_tokens,
                num_return_sequences=n, pad_token_id=self.tokenizer.pad_token_id,
            )
            self.stats["generate_s"] += time.perf_counter() - t0
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for j, i in enumerate(chunk):
                rows = new[j * n : (j + 1) * n] * (params.n // n)
                results[i] = [self._decode(r, encoded[i][1]) for r in rows]
                self.stats["generated_tokens"] += sum(c.num_tokens for c in results[i])
        return results  # type: ignore[return-value]

    def close(self) -> None:
        del self.model
