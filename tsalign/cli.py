"""The one entry point: `tsalign stage=<generate|rank|distill|dpo|evaluate|loop> [overrides]`.

    tsalign stage=generate iteration=0 data.max_prompts=8
    tsalign stage=loop iterations=2
    tsalign -m iteration=0,1 stage=generate,rank,distill,dpo     # pipeline order, one experiment
    tsalign -m stage=loop seed=1,2 dpo.beta=0.05,0.1              # one experiment per job
    tsalign stage=generate model=llama --cfg job                  # print the composed config
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tsalign.choices import ROLE_KINDS, Stage
from tsalign.config import conf_dir, register_configs
from tsalign.errors import TsalignError

CONF_DIR = str(conf_dir())


def validate(cfg: DictConfig) -> None:
    """What the schema's types cannot say: which model kinds each role takes, and value ranges.
    (Closed sets of values are enums in tsalign/choices.py, rejected by Hydra at compose time.)"""
    for role, kinds in ROLE_KINDS.items():
        kind = OmegaConf.select(cfg, f"{role}.kind")
        if kind not in kinds:
            raise TsalignError(f"{role}.kind={kind} is not one of: {', '.join(kinds)}")
    for key in ("iteration", "iterations", "generate.num_candidates", "data.prompts_per_iteration", "data.eval_prompts",
                "rank.shortlist_m"):
        if OmegaConf.select(cfg, key) < (0 if key == "iteration" else 1):
            raise TsalignError(f"{key} must be {'>= 0' if key == 'iteration' else '>= 1'}")


def swept_keys(hc) -> set[str]:
    """Keys the multirun sweeps over (several values), read from the sweep's multirun.yaml (written
    before any job starts, also seen by remote launchers on shared storage), else from argv."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = Path(hc.sweep.dir) / "multirun.yaml"
    task = list(OmegaConf.load(saved).hydra.overrides.task) if saved.is_file() else [
        a for a in sys.argv[1:] if not a.startswith("-")]
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}


def experiment_dir(cfg: DictConfig) -> Path:
    """outputs/<experiment_name>; in a sweep (`tsalign -m seed=1,2`) plus the job's swept values
    (`seed=1`), except the pipeline position (stage, iteration), which shares one experiment."""
    if cfg.experiment_dir:
        return Path(cfg.experiment_dir).resolve()
    root = Path(cfg.paths.outputs) / cfg.experiment_name
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hc = HydraConfig.get()
        keys = swept_keys(hc) - set(hc.job.config.override_dirname.exclude_keys)
        job = sorted(o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0] in keys)
        if job:
            root = root / ",".join(job).replace("/", "_")
    return root.resolve()


def configure(cfg: DictConfig) -> DictConfig:
    validate(cfg)
    cfg.experiment_dir = str(experiment_dir(cfg))
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        configure(cfg)
        print(f"[tsalign] stage={cfg.stage} iteration={cfg.iteration} experiment={cfg.experiment_dir} "
              f"policy={cfg.policy.name} teacher={cfg.teacher.name} student={cfg.student.name} "
              f"sampler={cfg.sampler.backend}")
        if cfg.stage == Stage.loop:
            from hydra.core.hydra_config import HydraConfig

            from tsalign.stages.loop import run_loop

            run_loop(cfg, list(HydraConfig.get().overrides.task))
        else:
            from tsalign.runner import run_stage

            run_stage(cfg, str(cfg.stage))
    except TsalignError as e:
        print(f"tsalign: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tsalign: interrupted; finished work is kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    # offline by default: nothing is fetched from a model hub at run time (set before transformers loads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    register_configs()
    _main()


if __name__ == "__main__":
    main()
