"""Typed config schemas, registered in Hydra's ConfigStore by `register_configs()` (the CLI calls it).

conf/config.yaml starts its defaults list with `tsalign_schema`, so every YAML merges into these
dataclasses: a misspelled key, a wrong type or a value outside a closed set (tsalign/config/choices.py)
fails at compose time with Hydra's own message naming the key.

What types cannot say (ranges, which model kinds a role takes, keys that exclude each other) each
section says in its `problems()`: one line per problem, naming the key and the fix. The CLI turns the
composed config into these objects once (OmegaConf.to_object); TsalignConfig.__post_init__ then
collects every section's problems and raises one TsalignError listing them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from tsalign.config.choices import (
    DUAL_CLIP,
    ROLE_KINDS,
    AdvantageClip,
    BudgetScope,
    Correction,
    CutAnswers,
    DataSource,
    Device,
    DistillSource,
    Dtype,
    LoggerBackend,
    ModelKind,
    PdistillLoss,
    PolicyFrom,
    Reference,
    Replay,
    SamplerBackend,
    Schedule,
    Selection,
    ServedApi,
    Stage,
    WandbMode,
)
from tsalign.errors import TsalignError

STAGES = tuple(Stage)
__all__ = ["STAGES", "TsalignConfig", "register_configs", "conf_dir"]


def too_small(at: str, section: object, minimum: int, keys: tuple[str, ...]) -> list[str]:
    """'<at><key> must be >= <minimum>' for each key below it: sizes that transformers / TRL / vLLM reject only deep
    inside a stage, after models have loaded, or that slicing would take as counted from the end (max_prompts=-1).
    An optional size left null is not checked."""
    return [f"{at}{key}={value} must be >= {minimum} (null: {_NULL_MEANS[key]})" if key in _NULL_MEANS
            else f"{at}{key} must be >= {minimum}"
            for key in keys if (value := getattr(section, key)) is not None and value < minimum]


# sizes typed `int | None`, and what null means
_NULL_MEANS = {"max_prompts": "the whole shard", "max_rows": "every row", "max_model_len": "the model's own context",
               "threads": "as many as this process may use, fewer beside a busy process"}


def not_negative(at: str, section: object, keys: tuple[str, ...]) -> list[str]:
    """Thresholds: `not >= 0` also catches nan."""
    return [f"{at}{key}={getattr(section, key)} must be >= 0" for key in keys if not getattr(section, key) >= 0]


def not_positive(at: str, section: object, keys: tuple[str, ...]) -> list[str]:
    """Learning rates: `not > 0` also catches nan."""
    return [f"{at}{key}={getattr(section, key)} must be > 0" for key in keys if not getattr(section, key) > 0]


@dataclass
class FitSpec:
    """How to fit a reward model on human preference pairs before first use (cached by content)."""

    data: str | None = None  # human pairs: llamafactory_dpo | a local JSON/JSONL file; null = no fit
    holdout: int = 30  # pairs held out to report accuracy (the same ones for every fit with this data and seed)
    # which share of the other pairs (in their seeded order) this fit trains on: the teacher and the
    # student take disjoint ranges of the same human pairs, so the student does not start as the teacher
    train_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    epochs: int = 2
    batch_size: int = 8
    learning_rate: float = 5e-5
    max_length: int = 256
    seed: int = 0

    def problems(self, at: str) -> list[str]:
        """at: where this fit sits (student.fit, teacher.fit). The range matters only when there is data to fit."""
        start_end = self.train_range
        if not self.data or (len(start_end) == 2 and 0.0 <= start_end[0] < start_end[1] <= 1.0):
            return []
        return [f"{at}.train_range={start_end} must be two fractions 0 <= start < end <= 1"]


@dataclass
class VLLMOptions:
    """A judge scored on a vLLM engine instead of transformers (tsalign.engines.vllm_engine)."""

    enabled: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # null = the judge's max_length + 8
    enforce_eager: bool | None = None  # null = eager on CPU, CUDA graphs on GPU
    kv_cache_gib: float | None = None  # null = 2 GiB on CPU (or VLLM_CPU_KVCACHE_SPACE), vLLM's share on GPU


@dataclass
class ServedOptions:
    """A teacher behind an HTTP server instead of in this process (tsalign/engines/scoring/served): set base_url.
    The teacher's identity (verdict ledger, manifests) is api + base_url + model + what shapes the answer."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8000 (openrlhf: the full URL); null = local model
    api: ServedApi = ServedApi.chat  # chat (judge) | classify | score | openrlhf (reward models)
    model: str | None = None  # the served model name (vLLM's --served-model-name); null = the server's default
    api_key_env: str | None = None  # the NAME of the env var holding the key (the key is never written anywhere)
    temperature: float = 0.0
    max_tokens: int = 1  # judge: 1 = the choice token's log-probabilities decide; more = a parsed answer
    top_logprobs: int = 20  # judge: alternatives returned per token (the choices must be among them)
    choice_token_ids: list[int] | None = None  # vLLM judge: ids of judge_choices, sent as logprob_token_ids
    # classify / openrlhf: the text of one (prompt, response); null (classify) = chat messages, server's template
    input_template: str | None = "{prompt}\n\n{response}"
    concurrency: int = 8  # requests in flight
    timeout_s: float = 120.0  # per request
    retries: int = 5  # on 429 / 5xx / connection errors, with exponential backoff; then an error
    backoff_s: float = 1.0  # first wait; doubled per retry (a 429's Retry-After is honoured)
    price_in_per_1k: float | None = None  # cost per 1k prompt tokens (reported when set)
    price_out_per_1k: float | None = None  # cost per 1k completion tokens


@dataclass
class ModelSpec:
    """One model: where it lives and what it is. Used for policy, teacher and student."""

    name: str = MISSING  # short label for logs and manifests
    # HF folder, hub id (read from the local HF cache only), or pkg://<python package>/<file.gguf | folder>;
    # null for a served teacher (served.base_url)
    path: str | None = MISSING
    kind: ModelKind = ModelKind.causal_lm  # per role: tsalign.config.choices.ROLE_KINDS
    # Config overrides that turn `path` into a small randomly initialised model with the real tokenizer.
    tiny: dict[str, Any] | None = None
    seed: int = 0  # init seed of a tiny model or of a new reward head
    dtype: Dtype = Dtype.float32
    trust_remote_code: bool = False
    # reward models only: fit on human pairs first when fit.data is set (the CPU teacher); a typed node, never
    # null, so `teacher.fit.data=...` works on the command line
    fit: FitSpec = field(default_factory=FitSpec)
    judge_prompt: str | None = None  # judges only: template with {prompt}, {response_a}, {response_b}
    judge_choices: list[str] = field(default_factory=lambda: ["A", "B"])
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # judges only: teacher.vllm.enabled=true
    served: ServedOptions = field(default_factory=ServedOptions)  # teachers only: asked over HTTP
    max_length: int = 512  # tokens a scorer reads (prompt truncated from the left, response kept)
    batch_size: int = 16

    def problems(self, role: str) -> list[str]:
        """role: the key this model sits at (policy, teacher, student); which kinds it takes is the caller's."""
        return (too_small(f"{role}.", self, 1, ("batch_size",)) + self.fit.problems(f"{role}.fit")
                + too_small(f"{role}.vllm.", self.vllm, 1, ("tensor_parallel_size", "max_model_len")))


@dataclass
class SamplerConfig:
    backend: SamplerBackend = SamplerBackend.hf
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    max_prompt_tokens: int = 512  # longer prompts are cut from the left (recorded per candidate)
    batch_size: int = 64  # hf: sequences per generate() call at most (engines/sampling/batching.py splits them)
    # vllm only
    dtype: Dtype | None = None  # the engine's dtype; null = policy.dtype (vLLM-CPU is fastest in bfloat16)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # GPU: share of its memory for weights + KV cache
    max_model_len: int | None = None  # null = the model's own context length
    enforce_eager: bool | None = None  # null = eager on CPU, CUDA graphs on GPU
    kv_cache_gib: float | None = None  # null = 2 GiB on CPU (or VLLM_CPU_KVCACHE_SPACE), vLLM's share on GPU
    # backend=auto only: measure hf and vLLM once per machine, model and engine versions (cached); false: decide by
    # the CPU's instruction sets alone
    calibrate: bool = True

    def problems(self) -> list[str]:
        found = too_small("sampler.", self, 1, ("max_new_tokens", "batch_size", "max_prompt_tokens",
                                                "tensor_parallel_size", "max_model_len"))
        if not self.temperature >= 0:  # vLLM's rule: 0 is greedy; transformers would take a negative one as greedy
            found.append(f"sampler.temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            found.append(f"sampler.top_p={self.top_p} must be in (0, 1] (1: the whole vocabulary)")
        return found


@dataclass
class DataConfig:
    source: DataSource = DataSource.alpaca_eval
    path: str | None = None  # source=file: JSON / JSONL / Parquet file or a `datasets` folder; source=hf: dataset
    prompt_field: str = "instruction"  # source=file|hf: a text field (column), or a list of chat messages
    # source=hf only: datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=streaming)
    name: str | None = None  # the dataset's configuration
    split: str = "train"
    data_files: str | None = None  # with path=json|parquet|csv: a file or glob
    streaming: bool = False  # iterate rows instead of preparing the whole set (large sets; with max_rows)
    max_rows: int | None = None  # read at most this many rows (the first ones)
    input_field: str | None = "input"  # appended to the instruction when present (Alpaca style)
    # a reference answer per prompt (generate.references); the embedded pools have one
    reference_field: str | None = "output"
    system_prompt: str | None = None
    eval_prompts: int = 32  # held-out shard, never trained on
    prompts_per_iteration: int = 32
    max_prompts: int | None = None  # cap on this iteration's shard (quick runs)
    schedule: Schedule = Schedule.fresh
    split_seed: int = 0

    def problems(self) -> list[str]:
        return too_small("data.", self, 1, ("prompts_per_iteration", "eval_prompts", "max_prompts", "max_rows"))


@dataclass
class OptimizerConfig:
    name: str = "adamw_torch"
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0

    def problems(self) -> list[str]:
        found = not_positive("optimizer.", self, ("learning_rate",))
        if not 0 <= self.warmup_ratio < 1:  # transformers 5 reads warmup_steps below 1 as a ratio
            found.append(f"optimizer.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        return found


@dataclass
class GenerateConfig:
    num_candidates: int = 4  # K
    # TSO's model matrix (tsalign/stages/matrix.py): more policies answering each prompt (initial = pi_0, a conf/policy
    # option, or a checkpoint path), matrix_candidates answers each; references adds the data's reference answer
    matrix: list[str] = field(default_factory=list)
    matrix_candidates: int = 2
    references: bool = False

    def problems(self) -> list[str]:
        return too_small("generate.", self, 1, ("num_candidates",))


@dataclass
class RankConfig:
    selection: Selection = Selection.best_worst  # which candidates the teacher sees
    shortlist_m: int = 1
    tie_threshold: float = 0.0  # teacher score gaps at or below this make no pair
    cut_answers: CutAnswers = CutAnswers.rejected_only  # answers cut at max_new_tokens are never chosen
    # Rank another experiment's candidates (its name under paths.outputs, or its dir): baselines on the same K
    candidates_from: str | None = None
    # teacher budget in calls (judge: comparisons, both orders; reward model: responses scored); prompts past
    # it make no pair (counted). null = no budget
    max_calls: int | None = None
    budget_scope: BudgetScope = BudgetScope.iteration  # experiment: earlier iterations' teacher calls count too
    uncertain_fraction: float = 0.5  # selection=uncertain: share of prompts (smallest student margins) to the teacher
    confident_pairs: bool = True  # selection=uncertain: the other prompts make the student's own pair
    # TSO: a pair of the prompt's reference answer vs a policy answer is labelled "reference wins"; a teacher
    # verdict against it is flipped (override) or dropped (filter); counted either way
    correction: Correction = Correction.none
    # the live audit: on this seeded share of prompts the teacher also scores all K candidates, and rank reports the
    # margin share its pairs kept vs random pairs, whether the shortlist held the teacher's best and worst, and the
    # student's Spearman with the teacher (tsalign.stages.audit). Its calls are counted apart, not charged to
    # max_calls, and make no pairs. 0 = off
    audit_fraction: float = 0.1

    def problems(self) -> list[str]:
        found = too_small("rank.", self, 1, ("shortlist_m",)) + not_negative("rank.", self, ("tie_threshold",))
        if not 0.0 <= self.audit_fraction <= 1.0:
            found.append(f"rank.audit_fraction={self.audit_fraction} must be between 0 and 1 (0: no audit)")
        if self.max_calls is not None and self.max_calls < 0:
            found.append(f"rank.max_calls={self.max_calls} must be >= 0 (null: no teacher budget)")
        if not 0.0 <= self.uncertain_fraction <= 1.0:
            found.append(f"rank.uncertain_fraction={self.uncertain_fraction} must be between 0 and 1")
        return found


@dataclass
class DistillConfig:
    source: DistillSource = DistillSource.teacher
    human_data: str = "llamafactory_dpo"
    replay: Replay = Replay.all  # earlier iterations' pairs mixed in
    # student_0's own human pairs (student.fit) mixed into every distill, so the teacher's few pairs per
    # iteration add to what the student learnt from humans instead of overwriting it (eval128 turns it on;
    # off by default: 9x the distill steps of `make run`, and no held-out gain measured yet)
    human_anchor: bool = False
    # the teacher's all-K scores of rank's audited prompts (rank.audit_fraction) as extra teacher pairs: its best vs
    # worst, second vs second-worst, ... per prompt (tsalign.algorithms.audit.nested_pairs), prompts of the held-out
    # pairs left out. Off by default: the audit then only measures
    audit_pairs: bool = False
    # a second, larger human check of the student: responses a human labelled good or bad (KTO data; neither
    # the teacher's nor student_0's fit saw them, and length does not separate them): AUC before and after,
    # with a paired bootstrap interval on the change. null = off
    human_labels: str | None = "llamafactory_kto"
    holdout_fraction: float = 0.2
    use_margin: bool = False
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 5e-5
    max_length: int = 256

    def problems(self) -> list[str]:
        sizes = too_small("distill.", self, 1, ("epochs", "batch_size"))
        return sizes + not_positive("distill.", self, ("learning_rate",))


@dataclass
class DpoConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # any TRL loss_type, or dual_clip (TSO: the sigmoid loss's margin clipped)
    dual_clip: list[float] = field(default_factory=lambda: [-2.0, 2.0])  # [low, high] of beta * margin
    reference: Reference = Reference.previous
    # TSO's reference refresh: every N optimizer steps the reference becomes the current policy (TRL's
    # sync_ref_model with mixup alpha 1); its log-probabilities are then recomputed. null = never
    reference_refresh_steps: int | None = None
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_length: int = 384
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    save_steps: int = 10  # step checkpoints so an interrupted DPO resumes
    logging_steps: int = 1

    def problems(self) -> list[str]:
        found = too_small("dpo.", self, 1, ("batch_size", "gradient_accumulation_steps"))
        found += not_positive("dpo.", self, ("beta",))  # 0: a constant loss (log 2), negative: the pairs reversed
        refresh = self.reference_refresh_steps
        if refresh is not None and (refresh < 1 or self.lora):
            found.append(f"dpo.reference_refresh_steps={refresh}: needs a whole number >= 1 and full fine-tuning "
                         "(dpo.lora=false; with LoRA there is no separate reference to refresh)")
        low_high = self.dual_clip
        if self.loss_type == DUAL_CLIP and not (len(low_high) == 2 and low_high[0] < low_high[1]):
            found.append(f"dpo.dual_clip={low_high} must be [low, high] with low < high")
        return found


@dataclass
class PdistillConfig:
    """stage=pdistill: distil an aligned teacher LM into a student LM (DCKD / ADPA, tsalign/stages/pdistill/).
    Models are a folder, or pi_<n> / pi_T (this experiment's DPO policies; pi_T the last one), or
    <experiment>:pi_<n> / <experiment>:pi_T (another experiment under paths.outputs)."""

    loss: PdistillLoss = PdistillLoss.dckd  # dckd | adpa | adpa_dckd (ADPA started from the DCKD student)
    teacher_policy: str = "pi_T"  # the aligned teacher (a causal LM sharing the student's tokenizer)
    teacher_reference: str = "pi_0"  # its reference (ADPA's advantage = log teacher - log reference)
    student: str = "pi_0"  # where the student starts
    data: str | None = None  # preference pairs: null = iter_<t>/rank/pairs.jsonl; llamafactory_dpo | a JSONL file
    max_pairs: int | None = None  # the first n pairs only (quick runs)
    top_k: int = 50  # teacher distributions are stored as top-k probabilities + one remainder bucket
    cache_dir: str | None = None  # teacher top-k caches; null = <paths.cache>/teacher_topk
    teacher_batch_size: int = 4  # sequences per teacher forward pass
    ce_weight: float = 1.0  # the SFT term on the chosen answer
    kl_weight: float = 0.1  # DCKD: weight of each KL constraint (chosen, rejected)
    advantage_weight: float = 1.6  # ADPA: weight of the expected advantage
    advantage_clip: AdvantageClip = AdvantageClip.none
    epochs: float = 1.0  # adpa_dckd: per phase
    max_steps: int = -1  # adpa_dckd: per phase
    batch_size: int = 2  # pairs per step (2 sequences each)
    gradient_accumulation_steps: int = 1
    max_length: int = 384  # tokens of prompt + response (prompt cut from the left, response from the end)
    logging_steps: int = 1

    def problems(self) -> list[str]:
        sizes = ("top_k", "batch_size", "teacher_batch_size", "gradient_accumulation_steps", "max_length")
        found = [f"pdistill.{key}={getattr(self, key)} must be >= 1" for key in sizes if getattr(self, key) < 1]
        if self.max_pairs is not None and self.max_pairs < 1:
            found.append(f"pdistill.max_pairs={self.max_pairs} must be >= 1 (null: every pair)")
        return found


@dataclass
class EvaluateConfig:
    # Who judges pi_{t+1} vs pi_0: null = the training teacher (then the win rate measures fit to the
    # optimised reward); or a conf/teacher/ option, e.g. evaluate.judge=llama3_70b_judge
    judge: str | None = None
    # which iteration-t policy is judged against pi_0: dpo (TS-Align, TSO) or pdistill (DCKD / ADPA's student)
    policy_from: PolicyFrom = PolicyFrom.dpo
    control: bool = True  # base-vs-base run: its win rate must sit near 50%
    tie_threshold: float = 0.0
    confidence: float = 0.95
    seed: int = 1234

    def problems(self) -> list[str]:
        found = not_negative("evaluate.", self, ("tie_threshold",))
        if not 0 < self.confidence < 1:
            found.append(f"evaluate.confidence={self.confidence} must be between 0 and 1 (0.95: 95% intervals)")
        return found


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    project: str = "tsalign"
    mode: WandbMode | None = None  # null = offline unless WANDB_MODE says otherwise
    entity: str | None = None


@dataclass
class LaunchConfig:
    """How stage=loop starts the training stages (dpo, distill): in one process, or under `accelerate
    launch` (DDP / DeepSpeed / FSDP) with this many processes; and generate over generate_processes.
    Single stages: run `accelerate launch` yourself (README: Scaling out)."""

    processes: int = 1
    # an accelerate config file: a name under conf/accelerate/ (ddp, deepspeed_zero2, deepspeed_zero3,
    # fsdp) or a path; null = plain DDP over `processes` (gloo on CPU, NCCL on GPUs)
    accelerate_config: str | None = None
    # generate: prompt shards over this many processes (`accelerate launch --multi_gpu`), one sampler
    # engine each on its own device; with sampler=vllm each engine takes sampler.tensor_parallel_size GPUs
    generate_processes: int = 1


@dataclass
class PathsConfig:
    outputs: str = "outputs"
    cache: str = MISSING  # converted models, fitted teachers, downloaded data packages


@dataclass
class TsalignConfig:
    stage: Stage = Stage.generate
    experiment_name: str = "default"
    experiment_dir: str | None = None  # resolved by the CLI: <paths.outputs>/<experiment_name>[/<sweep job>]
    iteration: int = 0
    iterations: int = 1  # stage=loop
    seed: int = 42
    redo: bool = False  # replace this stage's artifacts even if the config changed
    # a rank redo that makes no pair replaces a finished rank that has pairs only when this is set (the stage
    # where "empty" is defined); top level beside redo, out of every stage's config hash, as redo is
    redo_allow_empty: bool = False
    device: Device = Device.auto
    threads: int | None = None  # torch CPU threads
    policy: ModelSpec = MISSING
    teacher: ModelSpec = MISSING
    student: ModelSpec = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    pdistill: PdistillConfig = field(default_factory=PdistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        """Runs once, when the CLI turns the composed config into objects (OmegaConf.to_object). The sections
        have no __post_init__ of their own: they only list their problems, so all are reported together."""
        found = self.problems()
        if len(found) == 1:
            raise TsalignError(found[0])
        if found:
            numbered = "; ".join(f"({n}) {problem}" for n, problem in enumerate(found, 1))
            raise TsalignError(f"{len(found)} problems in the config: {numbered}")

    def problems(self) -> list[str]:
        """This config's own keys, each model role's (its kind: ROLE_KINDS), then every section with problems()."""
        found = too_small("", self, 0, ("iteration",)) + too_small("", self, 1, ("iterations", "threads"))
        name = self.experiment_name
        if not name or name in (".", "..") or "/" in name or "\\" in name:  # "" and ".." wrote beside or above outputs/
            found.append(f"experiment_name={name!r} must be one folder name (no '/', not '.' or '..'); "
                         "set paths.outputs to put experiments elsewhere")
        for role, kinds in ROLE_KINDS.items():
            spec = getattr(self, role)
            if spec.kind not in kinds:
                found.append(f"{role}.kind={spec.kind} is not one of: {', '.join(kinds)}")
            found += spec.problems(role)
        for section in (getattr(self, f.name) for f in fields(self) if f.name not in ROLE_KINDS):
            if hasattr(section, "problems"):
                found += section.problems()
        return found


def conf_dir() -> Path:
    """conf/ of a checkout or an editable install, else the copy shipped in the wheel (tsalign/conf)."""
    package = Path(__file__).resolve().parents[1]  # tsalign/
    source_tree = package.parent / "conf"
    return source_tree if (source_tree / "config.yaml").is_file() else package / "conf"


def register_configs() -> None:
    """Make `tsalign_schema` known to Hydra (idempotent). Called by the CLI and the tests, not on import."""
    ConfigStore.instance().store(name="tsalign_schema", node=TsalignConfig)
