"""Config -> engine: the sampler a policy generates with, the scorer a student / teacher / judge
scores with, and the teacher folder (fitted on human pairs once, when its option has a `fit` recipe).

Samplers and scorers themselves take plain arguments (tsalign.engines.sampling, tsalign.engines.scoring); this is the
one place that reads the Hydra config for them.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.config.options import model_option
from tsalign.engines.sampling import SamplingParams
from tsalign.stages.lineage import base_model_dir


def sampling_params(cfg: DictConfig, n: int, seed: int) -> SamplingParams:
    s = cfg.sampler
    return SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                          max_prompt_tokens=s.max_prompt_tokens, seed=seed)


def open_sampler(cfg: DictConfig, model_dir: Path, seed: int):
    from tsalign.engines.models import pick_device
    from tsalign.engines.sampling import make_sampler

    s = cfg.sampler
    return make_sampler(s.backend, model_dir, dtype=s.dtype or cfg.policy.dtype, device=pick_device(cfg.device),
                        batch_size=s.batch_size, seed=seed, tensor_parallel_size=s.tensor_parallel_size,
                        max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
                        enforce_eager=s.enforce_eager, kv_cache_gib=s.kv_cache_gib)


def open_scorer(cfg: DictConfig, spec: DictConfig, model_dir: Path | None):
    """The scorer of a model option; a served teacher (spec.served.base_url) has no model_dir (None)."""
    from tsalign.engines.models import pick_device
    from tsalign.engines.scoring import make_scorer
    from tsalign.engines.scoring.served import is_served

    served = OmegaConf.to_container(spec.served, resolve=True) if is_served(spec) else None
    return make_scorer(spec.kind, model_dir, device=pick_device(cfg.device), dtype=spec.dtype,
                       batch_size=spec.batch_size, max_length=spec.max_length, seed=spec.seed,
                       judge_prompt=spec.judge_prompt, judge_choices=tuple(spec.judge_choices),
                       vllm_options=vllm_options(spec), served=served, ledger_dir=Path(cfg.paths.cache))


def vllm_options(spec: DictConfig) -> dict | None:
    """A judge's vLLM engine options (None: the judge runs on transformers); unset ones are vLLM's defaults."""
    if not spec.vllm.enabled:
        return None
    options = {k: v for k, v in OmegaConf.to_container(spec.vllm).items() if k != "enabled" and v is not None}
    return {"max_model_len": spec.max_length + 8, **options}


def teacher_model_dir(cfg: DictConfig, spec: DictConfig | None = None) -> Path | None:
    """A teacher's folder (the configured teacher by default), fitted on human pairs first when its
    option has a `fit` recipe; None for a served teacher (no local weights to load, fit or hash)."""
    from tsalign.engines.scoring.served import is_served

    spec = cfg.teacher if spec is None else spec
    return None if is_served(spec) else fitted_model_dir(cfg, spec, "teacher")


def student_base_dir(cfg: DictConfig) -> Path:
    """student_0: the student option's model, fitted on its share of the human pairs when it has a `fit`
    recipe (so the first shortlist is not drawn by an untrained head)."""
    return fitted_model_dir(cfg, cfg.student, "student")


def fitted_model_dir(cfg: DictConfig, spec: DictConfig, role: str) -> Path:
    """A reward model's folder; one with a `fit` recipe is fitted on human pairs once and cached."""
    base = base_model_dir(cfg, spec)
    if not spec.fit.data:
        return base
    from tsalign.engines.models import pick_device
    from tsalign.training.reward_model import fitted_reward_model

    return fitted_reward_model(base, OmegaConf.to_container(spec.fit), Path(cfg.paths.cache), spec.name,
                               pick_device(cfg.device), spec.seed, role)


def teacher_option(name: str) -> DictConfig:
    """A conf/teacher/<name>.yaml option as a validated ModelSpec (e.g. for an independent judge)."""
    return model_option("teacher", name)


def judge_spec(cfg: DictConfig) -> DictConfig:
    return teacher_option(cfg.evaluate.judge) if cfg.evaluate.judge else cfg.teacher
