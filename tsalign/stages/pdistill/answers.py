"""ADPA's y_hat: the student answers each prompt once, greedily, with the configured sampler."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def greedy_params(cfg: DictConfig):
    from tsalign.engines.sampling import SamplingParams

    s = cfg.sampler
    return SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=s.max_new_tokens,
                          max_prompt_tokens=s.max_prompt_tokens, seed=cfg.seed)


def greedy_answers(cfg: DictConfig, student_dir: Path, prompts: list[list[dict]]) -> list[str]:
    """One greedy answer per prompt from the student (ADPA's y_hat), with the configured sampler."""
    from tsalign.engines.sampling.resumable import prompts_per_call
    from tsalign.progress import progress
    from tsalign.stages.factory import open_sampler

    params = greedy_params(cfg)
    sampler = open_sampler(cfg, student_dir, cfg.seed)
    # greedy answers do not depend on the call they are in: a vLLM engine on a GPU takes many prompts per call
    per_call = max(cfg.sampler.batch_size, prompts_per_call(sampler, 1))
    answers: list[str] = []
    try:
        with progress(len(prompts), "student greedy answers", "prompt") as bar:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start: start + per_call]
                answers += [c[0].text for c in sampler.generate(chunk, params)]
                bar.update(len(chunk))
    finally:
        sampler.close()
    return answers
