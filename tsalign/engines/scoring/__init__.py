"""Scorers: a reward model (sequence classifier, one output) or an LLM judge, behind one protocol (base.py)."""

from __future__ import annotations

from pathlib import Path

from tsalign.config.choices import ModelKind
from tsalign.engines.scoring.base import Scorer
from tsalign.errors import TsalignError


def make_scorer(kind: str, model_dir: Path | None, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                max_length: int = 512, seed: int = 0, judge_prompt: str | None = None,
                judge_choices: tuple[str, str] = ("A", "B"), vllm_options: dict | None = None,
                served: dict | None = None, ledger_dir: Path | None = None) -> Scorer:
    """A scorer over the HF folder `model_dir`: kind reward_model or judge (vllm_options: judge on vLLM);
    with `served` (a teacher.served node with base_url), the teacher over HTTP instead, its answers kept
    in a verdict ledger under `ledger_dir` (tsalign/engines/scoring/served)."""
    kind = ModelKind(kind)
    if served and served.get("base_url"):
        from tsalign.engines.scoring.served import make_served_scorer

        if ledger_dir is None:
            raise TsalignError("a served teacher needs a ledger_dir (paths.cache) to keep its answers in")
        return make_served_scorer(kind, served, ledger_dir, judge_prompt, judge_choices, max_length, batch_size)
    if kind is ModelKind.reward_model:
        from tsalign.engines.scoring.reward_model import RewardModelScorer

        return RewardModelScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size,
                                 max_length=max_length, seed=seed)
    if kind is not ModelKind.judge:
        raise TsalignError(f"a {kind} cannot score; a scorer is a reward_model or a judge")
    if not judge_prompt:
        raise TsalignError("a judge teacher needs teacher.judge_prompt with {prompt}, {response_a}, {response_b}")
    if vllm_options is not None:
        from tsalign.engines.scoring.judge import VLLMJudgeScorer

        return VLLMJudgeScorer(model_dir, dtype=dtype, batch_size=batch_size, max_length=max_length,
                               template=judge_prompt, choices=tuple(judge_choices), options=vllm_options)
    from tsalign.engines.scoring.judge import JudgeScorer

    return JudgeScorer(model_dir, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                       template=judge_prompt, choices=tuple(judge_choices))


__all__ = ["Scorer", "make_scorer"]
