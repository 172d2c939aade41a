"""What every stage shares: where pi_t and student_t come from, prompt shards, run-or-skip."""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.artifacts import StageRun, read_manifest, stage_dir, stage_lock
from tsalign.errors import TsalignError
from tsalign.tracking import start_tracker

log = logging.getLogger("tsalign")


@dataclass
class Plan:
    """What a stage's outputs depend on. Cheap to build: no model is loaded."""

    config: dict
    inputs: dict[str, Path] = field(default_factory=dict)


def section(cfg: DictConfig, *keys: str) -> dict:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k] for k in keys}


def exp_dir(cfg: DictConfig) -> Path:
    return Path(cfg.experiment_dir)


def finished_output(cfg: DictConfig, iteration: int, stage: str, name: str, needed_by: str) -> Path:
    """An upstream artifact; a clear error naming the command to run when it is not there yet."""
    directory = stage_dir(exp_dir(cfg), iteration, stage)
    if read_manifest(directory) is None:
        raise TsalignError(f"{needed_by} needs iter_{iteration}/{stage}/{name}, which is not finished; "
                           f"run `tsalign stage={stage} iteration={iteration}` first (same experiment_name)")
    return directory / name


def _trained_at(cfg: DictConfig, iteration: int, stage: str, name: str, symbol: str, base: str):
    if iteration == 0:
        return None, base
    return finished_output(cfg, iteration - 1, stage, name, f"iteration {iteration}"), f"{symbol}_{iteration}"


def policy_source(cfg: DictConfig, iteration: int) -> tuple[Path | None, str]:
    """pi_t: the base policy at t=0 (path None), else iter_<t-1>/dpo/policy; with its label."""
    return _trained_at(cfg, iteration, "dpo", "policy", "pi", cfg.policy.name)


def student_source(cfg: DictConfig, iteration: int) -> tuple[Path | None, str]:
    """student_t: the base student at t=0 (path None), else iter_<t-1>/distill/student; with its label."""
    return _trained_at(cfg, iteration, "distill", "student", "student", cfg.student.name)


def base_model_dir(cfg: DictConfig, spec: DictConfig) -> Path:
    from tsalign.models import resolve_model_dir

    tiny = OmegaConf.to_container(spec.tiny) if spec.tiny else None
    return resolve_model_dir(spec.path, cfg.paths.cache, tiny=tiny, kind=spec.kind, seed=spec.seed)


def prompt_split(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    from tsalign.data import load_prompt_pool, split_pool

    d = cfg.data
    pool = load_prompt_pool(d.source, cfg.paths.cache, d.path, d.prompt_field, d.input_field, d.system_prompt)
    return split_pool(pool, d.eval_prompts, d.prompts_per_iteration, d.split_seed)


def training_prompts(cfg: DictConfig, iteration: int) -> list[dict]:
    from tsalign.data import iteration_shard

    _, train = prompt_split(cfg)
    d = cfg.data
    return iteration_shard(train, iteration, d.prompts_per_iteration, d.schedule, d.max_prompts)


def stage_module(name: str):
    return importlib.import_module(f"tsalign.stages.{name}")


def stage_run(cfg: DictConfig, name: str, iteration: int | None = None) -> StageRun:
    t = cfg.iteration if iteration is None else iteration
    plan: Plan = stage_module(name).plan(cfg)
    config = {"iteration": t, **plan.config}
    return StageRun(stage_dir(exp_dir(cfg), t, name), name, t, config, plan.inputs, cfg.redo)


def work_stamp(cfg: DictConfig, name: str) -> dict:
    """What resumable partial work (_work/) is valid for: this config and these exact inputs."""
    run = stage_run(cfg, name)
    return {"config": run.config, "inputs": {k: v["sha256"] for k, v in run.input_fingerprints().items()}}


def run_stage(cfg: DictConfig, name: str) -> dict:
    """Skip if done; else run the stage, write its manifest last, and track it."""
    module = stage_module(name)
    run = stage_run(cfg, name)
    with stage_lock(run.directory):
        if run.is_done():
            print(f"[tsalign] iter_{cfg.iteration}/{name}: done already (manifest matches), skipped")
            return read_manifest(run.directory)
        run.begin()
        tracker = start_tracker(cfg.logger.backend, cfg.logger.project, cfg.experiment_name, name, cfg.iteration,
                                OmegaConf.to_container(cfg, resolve=True), exp_dir(cfg) / "wandb",
                                cfg.logger.mode, cfg.logger.entity)
        t0 = time.time()
        try:
            counts, outputs, extra = module.run(cfg, run.directory, tracker)
            manifest = run.finish(counts, outputs, extra)
            tracker.summary(counts)
        finally:
            with contextlib.suppress(Exception):  # tracking trouble never costs finished work
                tracker.finish()
        shutil.rmtree(run.directory / "_work", ignore_errors=True)  # resume state, no longer needed
    print(f"[tsalign] iter_{cfg.iteration}/{name}: finished in {time.time() - t0:.1f}s -> {run.directory}")
    return manifest


def teacher_model_dir(cfg: DictConfig, spec: DictConfig | None = None) -> Path:
    """A teacher's folder (the configured teacher by default); one with a `fit` recipe is fitted on
    human pairs once and cached."""
    spec = cfg.teacher if spec is None else spec
    base = base_model_dir(cfg, spec)
    if not spec.fit.data:
        return base
    from tsalign.models import pick_device
    from tsalign.reward_training import fitted_reward_model

    return fitted_reward_model(base, OmegaConf.to_container(spec.fit), Path(cfg.paths.cache), spec.name,
                               pick_device(cfg.device), spec.seed)


def teacher_option(name: str) -> DictConfig:
    """A conf/teacher/<name>.yaml option as a validated ModelSpec (e.g. for an independent judge)."""
    from tsalign.config import ModelSpec, conf_dir

    path = conf_dir() / "teacher" / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise TsalignError(f"no teacher option '{name}' in {path.parent}; use one of: {options}")
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelSpec), OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 -- a schema error in the YAML, in one line
        raise TsalignError(f"{path}: {str(e).splitlines()[0]}") from None


def open_scorer(cfg: DictConfig, spec: DictConfig, model_dir: Path):
    from tsalign.models import pick_device
    from tsalign.scoring import make_scorer

    return make_scorer(spec.kind, model_dir, device=pick_device(cfg.device), dtype=spec.dtype,
                       batch_size=spec.batch_size, max_length=spec.max_length, seed=spec.seed,
                       judge_prompt=spec.judge_prompt, judge_choices=tuple(spec.judge_choices),
                       vllm_options=OmegaConf.to_container(spec.vllm) if spec.vllm is not None else None)
