"""Reward-model scorer: any HF sequence classifier with one output, reading (prompt, response) text
through its own tokenizer (and chat template, when it has one). Prompts are cut from the left and
responses kept, and every cut is counted: nothing is truncated silently."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tsalign.engines.models import load_reward_model, load_tokenizer


def render_prompt(messages: list[dict]) -> str:
    """Plain text of a chat prompt, for encoders without a chat template."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_pair_text(tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[dict, bool]:
    """Token ids for one (prompt, response); returns (features, truncated)."""
    if tokenizer.chat_template:
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(head_ids)] != head_ids:  # template not prefix-stable: cut the whole from the left
            ids = full_ids[-max_length:]
            return {"input_ids": ids}, len(full_ids) > max_length
        tail = full_ids[len(head_ids) :][:max_length]
        keep = max_length - len(tail)
        ids = (head_ids[-keep:] if keep > 0 else []) + tail
        return {"input_ids": ids}, len(full_ids) > max_length
    # encoder with a sentence-pair format ([CLS] prompt [SEP] response [SEP])
    p_ids = tokenizer(render_prompt(prompt), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    budget = max_length - 3
    r_ids = r_ids[:budget]
    keep = max(budget - len(r_ids), 0)
    truncated = len(p_ids) > keep or len(r_ids) == budget
    p_text = tokenizer.decode(p_ids[-keep:]) if keep else ""
    enc = tokenizer(p_text, tokenizer.decode(r_ids), truncation="only_second", max_length=max_length)
    return {k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")}, truncated


def collate(tokenizer, features: list[dict], device: str) -> dict:
    batch = tokenizer.pad(features, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


class RewardModelScorer:
    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                 max_length: int = 512, seed: int = 0):
        self.tokenizer = load_tokenizer(model_dir, padding_side="right")
        self.model = load_reward_model(model_dir, dtype=dtype, device=device, seed=seed)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # where the classifier reads the reward
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.stats = {"calls": 0, "truncated": 0, "seconds": 0.0}

    @torch.no_grad()
    def score_texts(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        t0 = time.perf_counter()
        encoded = [encode_pair_text(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        self.stats["truncated"] += sum(cut for _, cut in encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]["input_ids"]))  # less padding
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = collate(self.tokenizer, [encoded[i][0] for i in idx], self.device)
            logits = self.model(**batch).logits[:, 0].float().tolist()
            for i, s in zip(idx, logits):
                scores[i] = s
        self.stats["calls"] += len(encoded)
        self.stats["seconds"] += time.perf_counter() - t0
        return scores

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]:
        flat_p = [p for p, g in zip(prompts, groups) for _ in g]
        flat_r = [r for g in groups for r in g]
        flat = iter(self.score_texts(flat_p, flat_r))
        return [[next(flat) for _ in g] for g in groups]

    def close(self) -> None:
        del self.model
