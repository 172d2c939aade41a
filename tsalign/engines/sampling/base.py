"""The Sampler protocol: chat prompts in, K completions per prompt out, as text."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int  # K candidates per prompt
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    max_prompt_tokens: int = 512
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS reached) | "length" (cut at max_new_tokens)
    num_tokens: int
    prompt_truncated: bool = False


class Sampler(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def chat_prompt_ids(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a chat prompt ending in the assistant turn; over-long prompts lose their start."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds BOS
    if len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False
