"""Scorers: a reward model (sequence classifier, one output) or an LLM judge, behind one protocol (base.py)."""

from __future__ import annotations

from pathlib import Path

from tsalign.choices import ModelKind
from tsalign.errors import TsalignError
from tsalign.scoring.base import Scorer


def make_scorer(kind: str, model_dir: Path, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                max_length: int = 512, seed: int = 0, judge_prompt: str | None = None,
                judge_choices: tuple[str, str] = ("A", "B"), vllm_options: dict | None = None) -> Scorer:
    """A scorer over the HF folder `model_dir`: kind reward_model or judge (vllm_options: judge on vLLM)."""
    kind = ModelKind(kind)
    if kind is ModelKind.reward_model:
        from tsalign.scoring.reward_model import RewardModelScorer

        return RewardModelScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
    if kind is not ModelKind.judge:
        raise TsalignError(f"a {kind} cannot score; a scorer is a reward_model or a judge")
    if not judge_prompt:
        raise TsalignError("a judge teacher needs teacher.judge_prompt with {prompt}, {response_a}, {response_b}")
    if vllm_options is not None:
        from tsalign.scoring.judge import VLLMJudgeScorer

        return VLLMJudgeScorer(model_dir, dtype=dtype, batch_size=batch_size, max_length=max_length,
                               template=judge_prompt, choices=tuple(judge_choices), options=vllm_options)
    from tsalign.scoring.judge import JudgeScorer

    return JudgeScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                       template=judge_prompt, choices=tuple(judge_choices))


__all__ = ["Scorer", "make_scorer"]
