"""Where a stage's inputs come from: pi_t, student_t, finished upstream outputs, prompt shards.

    pi_t       = the base policy at t = 0, else iter_<t-1>/dpo/policy
    student_t  = the base student at t = 0, else iter_<t-1>/distill/student
    prompts    = a held-out evaluation shard, and one training shard per iteration (data.schedule)

Reading a finished output checks it against its manifest first (artifacts.verify_output): a file
changed or cut after its stage finished is an error naming the stage to redo, never silent input.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.artifacts.store import read_manifest, stage_dir, verify_output
from tsalign.errors import TsalignError


def experiment_dir(cfg: DictConfig) -> Path:
    return Path(cfg.experiment_dir)


def finished_output(cfg: DictConfig, iteration: int, stage: str, name: str, needed_by: str) -> Path:
    """An upstream artifact, verified; a clear error naming the command to run when it is not there."""
    directory = stage_dir(experiment_dir(cfg), iteration, stage)
    if read_manifest(directory) is None:
        raise TsalignError(f"{needed_by} needs iter_{iteration}/{stage}/{name}, which is not finished; "
                           f"run `tsalign stage={stage} iteration={iteration}` first (same experiment_name)")
    return verify_output(directory / name)


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
    """The local HF folder of a configured base model (converted or built into the cache once)."""
    from tsalign.engines.models import resolve_model_dir

    tiny = OmegaConf.to_container(spec.tiny) if spec.tiny else None
    return resolve_model_dir(spec.path, cfg.paths.cache, tiny=tiny, kind=spec.kind, seed=spec.seed)


@functools.lru_cache(maxsize=4)
def _read_pool(source: str, cache: str, path: str | None, prompt_field: str, input_field: str | None,
               system_prompt: str | None, stamp: tuple, hf: tuple = (),
               reference_field: str | None = None) -> tuple[tuple[dict, ...], int]:
    from tsalign.data import load_prompt_pool

    pool, skipped = load_prompt_pool(source, cache, path, prompt_field, input_field, system_prompt, with_skipped=True,
                                     hf=dict(hf), reference_field=reference_field)
    return tuple(pool), skipped


def prompt_pool(cfg: DictConfig) -> tuple[list[dict], int]:
    """(every prompt of data.*, how many empty prompts were skipped). Read once per process: the
    preflight checks, the stage and its counts share it (a changed file is read again)."""
    d = cfg.data
    file = Path(d.path).expanduser() if d.path else None
    stamp = (file.stat().st_size, file.stat().st_mtime_ns) if file is not None and file.is_file() else ()
    from tsalign.data import HF_KEYS

    hf = tuple((k, d[k]) for k in HF_KEYS) if d.source == "hf" else ()  # data=hf's load_dataset options
    pool, skipped = _read_pool(str(d.source), str(cfg.paths.cache), d.path, d.prompt_field, d.input_field,
                               d.system_prompt, stamp, hf, d.reference_field)
    return list(pool), skipped


def prompt_split(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """(held-out evaluation prompts, training pool), deterministic in data.split_seed."""
    from tsalign.data import split_pool

    d = cfg.data
    return split_pool(prompt_pool(cfg)[0], d.eval_prompts, d.prompts_per_iteration, d.split_seed)


def training_prompts(cfg: DictConfig, iteration: int) -> list[dict]:
    """Iteration t's training shard."""
    from tsalign.data import iteration_shard

    _, train = prompt_split(cfg)
    d = cfg.data
    return iteration_shard(train, iteration, d.prompts_per_iteration, d.schedule, d.max_prompts)
