"""The one entry point: `tsalign stage=<generate|rank|distill|dpo|evaluate|loop> [overrides]`.

    tsalign stage=generate iteration=0 data.max_prompts=8
    tsalign stage=loop iterations=2
    tsalign -m iteration=0,1 stage=generate,rank,distill,dpo     # pipeline order, one experiment
    tsalign -m stage=loop seed=1,2 dpo.beta=0.05,0.1              # one experiment per job
    tsalign stage=generate model=llama --cfg job                  # print the composed config
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import tsalign.config  # noqa: F401  (registers the schema in Hydra's ConfigStore)
from tsalign.config import STAGES
from tsalign.errors import TsalignError


def _conf_dir() -> str:
    here = Path(__file__).resolve().parent
    source_tree = here.parent / "conf"  # a checkout or an editable install
    return str(source_tree if (source_tree / "config.yaml").is_file() else here / "conf")


CONF_DIR = _conf_dir()

_CHOICES = {
    "stage": STAGES,
    "policy.kind": ("causal_lm",),
    "student.kind": ("reward_model",),
    "teacher.kind": ("reward_model", "judge"),
    "sampler.backend": ("hf", "vllm"),
    "data.source": ("alpaca_eval", "alpaca", "file"),
    "data.schedule": ("fresh", "reuse"),
    "rank.selection": ("best_worst", "top_bottom", "all", "random_pair", "student_only"),
    "distill.source": ("teacher", "human"),
    "distill.replay": ("all", "last", "none"),
    "dpo.reference": ("previous", "initial"),
    "logger.backend": ("none", "wandb"),
    "device": ("auto", "cpu", "cuda"),
}


def validate(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise TsalignError(f"{key}={value} is not one of: {', '.join(allowed)}")
    for key in ("iteration", "iterations", "generate.num_candidates", "data.prompts_per_iteration"):
        if OmegaConf.select(cfg, key) < (0 if key == "iteration" else 1):
            raise TsalignError(f"{key} must be {'>= 0' if key == 'iteration' else '>= 1'}")


def experiment_dir(cfg: DictConfig) -> Path:
    """outputs/<experiment_name>, plus the job's overrides in a sweep (`tsalign -m seed=1,2`)."""
    if cfg.experiment_dir:
        return Path(cfg.experiment_dir).resolve()
    root = Path(cfg.paths.outputs) / cfg.experiment_name
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and hc.job.override_dirname:
            root = root / hc.job.override_dirname.replace("/", "_")
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
        if cfg.stage == "loop":
            from hydra.core.hydra_config import HydraConfig

            from tsalign.stages.loop import run_loop

            run_loop(cfg, list(HydraConfig.get().overrides.task))
        else:
            from tsalign.stages.common import run_stage

            run_stage(cfg, cfg.stage)
    except TsalignError as e:
        print(f"tsalign: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tsalign: interrupted; finished work is kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
