"""Option files of conf/ read outside Hydra's composition: a conf/teacher option as an independent judge,
a conf/policy option in TSO's model matrix, a conf/accelerate file for `accelerate launch`. One loader, one
message naming the options there are.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.config.schema import ModelSpec, conf_dir
from tsalign.errors import TsalignError


def option_file(group: str, name: str) -> Path | None:
    """conf/<group>/<name>.yaml, or None when there is no such option."""
    path = conf_dir() / group / f"{name}.yaml"
    return path if path.is_file() else None


def options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))


def model_option(group: str, name: str) -> DictConfig:
    """A conf/<group>/<name>.yaml model option (teacher, policy, student) as a validated ModelSpec."""
    path = option_file(group, name)
    if path is None:
        raise TsalignError(f"no {group} option '{name}' in {conf_dir() / group}; use one of: {options(group)}")
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelSpec), OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 -- a schema error in the YAML, in one line
        raise TsalignError(f"{path}: {str(e).splitlines()[0]}") from None


def accelerate_config_file(name: str) -> Path:
    """conf/accelerate/<name>.yaml, or a path to an accelerate config file."""
    path = option_file("accelerate", name) or Path(name).expanduser()
    if not path.is_file():
        raise TsalignError(f"launch.accelerate_config={name}: no such file; use one of {options('accelerate')} "
                           "or a path")
    return path
