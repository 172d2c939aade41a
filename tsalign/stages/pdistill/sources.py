"""What pdistill reads: its models (teacher, its reference, the student) and its preference pairs.

plan() resolves them once (model_ref, pairs_source: names, finished stages, verified folders) and declares
them; run() reads that declaration back (declared_models) instead of resolving them again.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from tsalign.artifacts.store import read_manifest, stage_dir, verify_output
from tsalign.config.choices import PdistillLoss
from tsalign.errors import TsalignError
from tsalign.stages.contract import StageContext
from tsalign.stages.lineage import base_model_dir, experiment_dir, finished_output

MODELS = ("teacher_policy", "teacher_reference", "student")
_PI = re.compile(r"^pi_(\d+|T)$")


def phases(loss: str) -> list[str]:
    return {PdistillLoss.dckd: ["dckd"], PdistillLoss.adpa: ["adpa"], PdistillLoss.adpa_dckd: ["dckd", "adpa"]}[
        PdistillLoss(loss)]


def model_ref(cfg: DictConfig, key: str) -> tuple[Path | None, str]:
    """(folder, label) of pdistill.<key>: pi_0 (the base policy: folder None), pi_<n> / pi_T of this experiment
    or <experiment>:pi_<n> / <experiment>:pi_T of another one (its iter_<n-1>/dpo/policy), or a model folder."""
    text = str(cfg.pdistill[key])
    where = f"pdistill.{key}={text}"
    name, sep, pi = text.rpartition(":")
    if not (sep and name and _PI.match(pi)):
        name, pi = "", text
    if not _PI.match(pi):
        folder = Path(text).expanduser()
        if not (folder / "config.json").is_file():
            raise TsalignError(f"{where}: not a model folder (no config.json) nor pi_<n> / pi_T / <experiment>:pi_<n>")
        return folder.resolve(), text
    n = _PI.match(pi).group(1)
    if n == "0":
        return None, cfg.policy.name
    exp = (Path(cfg.paths.outputs) / name).resolve() if name else experiment_dir(cfg)
    if n == "T":
        done = [int(d.parent.name[5:]) for d in exp.glob("iter_*/dpo") if d.parent.name[5:].isdigit()
                and read_manifest(d) is not None]
        if not done:
            raise TsalignError(f"{where}: {exp} has no finished dpo stage, so no aligned policy; run the TS-Align loop "
                               "there first (`tsalign stage=loop`) or name the teacher's folder")
        n = str(max(done) + 1)
    directory = stage_dir(exp, int(n) - 1, "dpo")
    if read_manifest(directory) is None:
        raise TsalignError(f"{where}: {directory} is not finished; run `tsalign stage=dpo iteration={int(n) - 1}` "
                           "there first or name a model folder")
    return verify_output(directory / "policy"), f"{name + ':' if name else ''}pi_{n}"


def pairs_source(cfg: DictConfig) -> tuple[Path | None, str]:
    data = cfg.pdistill.data
    if data is None:
        return finished_output(cfg, cfg.iteration, "rank", "pairs.jsonl", "pdistill"), f"iter_{cfg.iteration}/rank"
    if data == "llamafactory_dpo":
        return None, data
    path = Path(data).expanduser()
    if not path.is_file():
        raise TsalignError(f"pdistill.data={data}: no such file (a JSONL of prompt / chosen / rejected, e.g. a rank "
                           "stage's pairs.jsonl, or llamafactory_dpo)")
    return verify_output(path.resolve()), str(data)


def used_models(cfg: DictConfig) -> dict[str, tuple[Path | None, str]]:
    """(folder, label) of every model pdistill.loss needs: ADPA's reference only with an ADPA phase."""
    keys = MODELS if "adpa" in phases(cfg.pdistill.loss) else ("teacher_policy", "student")
    return {key: model_ref(cfg, key) for key in keys}


def declared_models(ctx: StageContext) -> dict[str, Path]:
    """The folder of every model plan declared (a `<key>_used` label in its config): its input, or the base
    policy for pi_0, which plan leaves out of its inputs (cfg.policy in its config slice names it)."""
    cfg = ctx.cfg
    return {key: ctx.inputs.get(key) or base_model_dir(cfg, cfg.policy)
            for key in MODELS if f"{key}_used" in ctx.plan.config}
