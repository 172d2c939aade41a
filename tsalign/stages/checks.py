"""Checks before a stage (tsalign.pipeline.runner) or a loop (tsalign.pipeline.loop) starts, reading no model
weights: every model path under the key that names it, the student's role (a reward model or an
encoder, never a causal LM), each max_length against the model's positions (its config.json), a vLLM
engine's max_model_len against the prompt + answer it must hold, K >= 2
where pairs are made, the prompts, the tracker settings. A failure is one line naming the key to fix,
raised before anything is written or any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.config.choices import ModelKind
from tsalign.engines.models import model_config
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.lineage import prompt_split
from tsalign.stages.resource_plan import check_fits

# position ids of these start after the padding index: 514 positions read 512 tokens
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}


@dataclass(frozen=True)
class ModelInfo:
    """A model's config.json, read without its weights, and the words that name it in a message."""

    name: str  # "student.path=/x", or the finished output it comes from
    config: dict | None  # None: a GGUF not converted yet (nothing to read before conversion)
    base: bool  # a configured base model (not a trained output of an earlier stage)


def base_model(cfg: DictConfig, key: str, spec: DictConfig | None = None) -> ModelInfo:
    """The base model of role `key` (policy / student / teacher), its path checked under its key."""
    spec = cfg[key] if spec is None else spec
    if spec.path is None:
        served = f" (or {key}.served.base_url for a teacher served over HTTP)" if key == "teacher" else ""
        raise TsalignError(f"{key}.path is not set: a model folder, hub id or pkg:// path{served}")
    name = f"{key}.path={spec.path}"
    try:
        found = model_config(spec.path, cfg.paths.cache, dict(spec.tiny) if spec.tiny else None)
    except TsalignError as e:
        raise TsalignError(f"{name}: {e}") from None
    return ModelInfo(name, found[0] if found else None, base=True)


def trained_model(folder: Path) -> ModelInfo:
    return ModelInfo(str(folder), json.loads((folder / "config.json").read_text(encoding="utf-8")), base=False)


def model_at(cfg: DictConfig, key: str, trained: Path | None) -> ModelInfo:
    return trained_model(trained) if trained is not None else base_model(cfg, key)


def positions(config: dict) -> int | None:
    """The longest input the model can take; None: its config.json sets no limit. DeBERTa (v1, v2/v3) without
    absolute position embeddings (position_biased_input false) has none: relative positions are log-bucketed
    and clamped (transformers models/deberta_v2 make_log_bucket_position), so max_position_embeddings is the
    length it was trained at, not a size its tensors must fit."""
    if config.get("model_type") in ("deberta", "deberta-v2") and config.get("relative_attention") \
            and not config.get("position_biased_input", True):
        return None
    n = config.get("max_position_embeddings") or config.get("n_positions")
    return n - _POSITION_OFFSET.get(config.get("model_type"), 0) if isinstance(n, int) else None


def check_lengths(model: ModelInfo, lengths: dict[str, int]) -> None:
    """Each {config key: length} fits the model's positions (a longer input is a tensor-size crash)."""
    limit = positions(model.config or {})
    for key, value in lengths.items():
        if value < 1:
            raise TsalignError(f"{key}={value} must be >= 1")
        if limit is not None and value > limit:
            raise TsalignError(f"{key}={value} is longer than {model.name} can read ({limit} positions, "
                               f"max_position_embeddings in its config.json); set {key}={limit} or less")


def is_causal_lm(config: dict) -> str | None:
    """The causal-LM architecture of a config, or None (classifiers, encoders, unknown)."""
    archs = config.get("architectures") or []
    if any("SequenceClassification" in a for a in archs):
        return None
    return next((a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))), None)


def check_reward_model(model: ModelInfo, key: str, spec: DictConfig) -> None:
    """A reward-model role takes a sequence classifier with one output, or an encoder that gets a new
    head. A causal LM would get a random score head and 'work' with meaningless scores: refused."""
    if not model.base or spec.tiny or spec.kind != ModelKind.reward_model or model.config is None:
        return  # trained outputs are classifiers; tiny test models are built with the head their kind needs
    arch = is_causal_lm(model.config)
    if arch:
        judge = " (or teacher.kind=judge to ask it as an LLM judge)" if key == "teacher" else ""
        raise TsalignError(f"{model.name} is a causal LM ({arch}), not a reward model: {key} must be a sequence "
                           f"classifier with one output (e.g. a *ForSequenceClassification reward model) or an encoder "
                           f"that gets a new head (e.g. a BERT / MiniLM folder, {key}=minilm{'_rm' * (key == 'teacher')})"
                           f"{judge}")


# ---------------------------------------------------------------- per role


def check_student(cfg: DictConfig, trained: Path | None, length_key: str, length: int) -> None:
    model = model_at(cfg, "student", trained)
    check_reward_model(model, "student", cfg.student)
    lengths = {length_key: length}
    if trained is None and cfg.student.fit.data:  # student_0 is fitted on human pairs first
        lengths["student.fit.max_length"] = cfg.student.fit.max_length
        check_fit_ranges(cfg)
    check_lengths(model, lengths)


def check_fit_ranges(cfg: DictConfig) -> None:
    """student_0's human pairs should be disjoint from the teacher's, or the student starts as a copy of it."""
    student, teacher = cfg.student.fit, cfg.teacher.fit  # ranges themselves: checked with the config
    same_pairs = teacher.data == student.data and (teacher.holdout, teacher.seed) == (student.holdout, student.seed)
    (s0, s1), (t0, t1) = student.train_range, teacher.train_range
    if same_pairs and s0 < t1 and t0 < s1:
        say(f"[tsalign] note: student.fit.train_range={list(student.train_range)} overlaps "
              f"teacher.fit.train_range={list(teacher.train_range)}: student_0 learns pairs the teacher learned")


def check_engine_context(key: str, max_model_len: int | None, parts: dict[str, int], fix: str = "") -> None:
    """A vLLM engine's max_model_len holds each request: prompt + answer (`parts`, {key: tokens}). A smaller one is
    no error to vLLM: its warm-up failed with a traceback and the sampler cut every prompt to fit (1 token at
    max_model_len=8), and the run 'succeeded'."""
    needed = sum(parts.values())
    if max_model_len is None or max_model_len >= needed:
        return
    terms = " + ".join(f"{k}={v}" if "." in k else f"{v} {k}" for k, v in parts.items())  # a key, or words
    raise TsalignError(f"{key}={max_model_len} cannot hold {terms} = {needed} tokens; set {key}={needed} "
                       f"or more{fix}")


def check_sampler(cfg: DictConfig) -> None:
    """The vLLM sampler's context holds the longest prompt it keeps and the answer."""
    s = cfg.sampler
    if s.backend != "vllm":
        return
    room = (s.max_model_len or 0) - s.max_new_tokens
    fix = f" (or sampler.max_prompt_tokens={room})" if room > 0 else ""
    check_engine_context("sampler.max_model_len", s.max_model_len,
                         {"sampler.max_prompt_tokens": s.max_prompt_tokens, "sampler.max_new_tokens": s.max_new_tokens},
                         fix)


def check_vllm_judge(spec: DictConfig, key: str) -> None:
    """A judge on vLLM reads at most {key}.max_length tokens and answers with one."""
    if spec.kind == ModelKind.judge and spec.vllm.enabled:
        check_engine_context(f"{key}.vllm.max_model_len", spec.vllm.max_model_len,
                             {f"{key}.max_length": spec.max_length, "answer token": 1},
                             f" (or null: {key}.max_length + 8)")


def check_teacher(cfg: DictConfig, spec: DictConfig | None = None, key: str = "teacher") -> None:
    spec = cfg.teacher if spec is None else spec
    from tsalign.engines.scoring.served import check_options, is_served

    if is_served(spec):  # no local weights: check what will be sent, not a model folder
        return check_options(spec.kind, OmegaConf.to_container(spec.served, resolve=True), spec.judge_prompt, key)
    check_vllm_judge(spec, key)
    model = base_model(cfg, key, spec)
    check_reward_model(model, "teacher", spec)
    lengths = {f"{key}.max_length": spec.max_length}
    if spec.fit.data:
        lengths[f"{key}.fit.max_length"] = spec.fit.max_length
    check_lengths(model, lengths)


def check_judge(cfg: DictConfig) -> None:
    """evaluate's judge: the teacher, or a conf/teacher option named by evaluate.judge."""
    if not cfg.evaluate.judge:
        return check_teacher(cfg)
    from tsalign.stages.factory import teacher_option

    try:
        check_teacher(cfg, teacher_option(cfg.evaluate.judge), "teacher")
    except TsalignError as e:
        raise TsalignError(f"evaluate.judge={cfg.evaluate.judge}: {e}") from None


def check_stage(cfg: DictConfig, stage) -> None:
    """Everything `stage` (a tsalign.stages.contract.Stage) at cfg.iteration can be refused for before it
    loads a model: its own check, then its estimated memory per GPU (tsalign stage=plan)."""
    stage.check(cfg)
    check_fits(cfg, stage.name)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()  # NVML where it can: does not start CUDA in this process


def check_launch(cfg: DictConfig, gpus: int | None = None) -> None:
    """The loop's process counts and vLLM's tensor parallelism against the GPUs this node shows (a CPU
    node runs any count over gloo). Without it `accelerate launch` fails after the first stages ran."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus == 0:
        return
    launch, vllm = cfg.launch, cfg.sampler.backend == "vllm"
    wanted = {"launch.processes": launch.processes,
              "launch.generate_processes x sampler.tensor_parallel_size":
                  launch.generate_processes * (cfg.sampler.tensor_parallel_size if vllm else 1)}
    if cfg.teacher.vllm.enabled and cfg.teacher.kind == ModelKind.judge:
        wanted["teacher.vllm.tensor_parallel_size"] = cfg.teacher.vllm.tensor_parallel_size
    for key, count in wanted.items():
        if count > gpus:
            raise TsalignError(f"{key} = {count} needs {count} GPUs and this node shows {gpus}; set it to {gpus} or "
                               f"less (model=llama is sized for 8: e.g. launch.processes={gpus} "
                               f"launch.generate_processes={gpus})")


def check_loop(cfg: DictConfig) -> None:
    """The loop's settings and base models, before its first stage starts."""
    k = cfg.generate.num_candidates
    if k < 2:
        raise TsalignError(f"generate.num_candidates={k}: the loop needs at least 2 candidates per prompt (rank makes "
                           "a pair of two); set generate.num_candidates=4")
    check_launch(cfg)
    check_sampler(cfg)
    check_lengths(base_model(cfg, "policy"), {"dpo.max_length": cfg.dpo.max_length})
    if cfg.iteration == 0:  # the base student is read at iteration 0 only
        check_student(cfg, None, "student.max_length", cfg.student.max_length)
        check_student(cfg, None, "distill.max_length", cfg.distill.max_length)
    check_teacher(cfg)
    check_judge(cfg)
    prompt_split(cfg)
    check_fits(cfg, "loop")
