"""The Scorer protocol: for each prompt, a score per candidate response (higher is better)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tsalign.errors import TsalignError


class Scorer(Protocol):
    stats: dict  # calls (responses scored or comparisons asked), truncated, seconds

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]: ...

    def close(self) -> None: ...


def make_scorer(kind: str, model_dir: Path, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                max_length: int = 512, seed: int = 0, judge_prompt: str | None = None,
                judge_choices: tuple[str, str] = ("A", "B"), vllm_options: dict | None = None) -> Scorer:
    if kind == "reward_model":
        from tsalign.scoring.reward_model import RewardModelScorer

        return RewardModelScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
    if kind == "judge":
        from tsalign.scoring.judge import JudgeScorer

        if not judge_prompt:
            raise TsalignError("a judge teacher needs teacher.judge_prompt with {prompt}, {response_a}, {response_b}")
        if vllm_options is not None:
            from tsalign.scoring.judge import VLLMJudgeScorer

            return VLLMJudgeScorer(model_dir, dtype=dtype, batch_size=batch_size, max_length=max_length,
                                   template=judge_prompt, choices=tuple(judge_choices), options=vllm_options)
        return JudgeScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                           template=judge_prompt, choices=tuple(judge_choices))
    raise TsalignError(f"scorer kind '{kind}' unknown; use reward_model or judge")
