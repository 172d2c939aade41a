"""Every closed set of config values, written once as a type.

The schema (tsalign/config/schema.py) types its fields with these enums, so Hydra rejects a value outside
the set at compose time, naming the key and the allowed values. They are StrEnums: a member equals
its string ("hf" == SamplerBackend.hf) and serialises as that string in manifests and JSON.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    generate = "generate"
    rank = "rank"
    distill = "distill"
    dpo = "dpo"
    evaluate = "evaluate"
    pdistill = "pdistill"  # policy distillation from an aligned teacher LM (DCKD / ADPA), tsalign/stages/pdistill/
    loop = "loop"
    status = "status"  # what is done, partial or missing, and what to run next (reads manifests only)
    report = "report"  # the experiment's report.html
    plan = "plan"  # per stage: the models it holds, memory per device, whether it fits (reads config.json only)


class ModelKind(StrEnum):
    causal_lm = "causal_lm"
    reward_model = "reward_model"
    judge = "judge"


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class SamplerBackend(StrEnum):
    hf = "hf"
    vllm = "vllm"
    auto = "auto"  # the faster of the two on this machine (tsalign.engines.engine_choice), resolved before a stage runs


class DataSource(StrEnum):
    alpaca_eval = "alpaca_eval"
    alpaca = "alpaca"
    file = "file"
    hf = "hf"  # datasets.load_dataset: a hub id in the local HF cache, a local dataset folder, json/parquet/csv files


class Schedule(StrEnum):
    fresh = "fresh"  # a new shard of training prompts per iteration
    reuse = "reuse"  # shard 0 every iteration


class Selection(StrEnum):
    best_worst = "best_worst"  # the student's best and worst go to the teacher (TS-Align)
    top_bottom = "top_bottom"  # the student's top-m and bottom-m
    all = "all"  # the teacher scores every candidate (teacher-only baseline)
    random_pair = "random_pair"  # two random candidates
    student_only = "student_only"  # no teacher: the student's best vs worst
    # best_worst where the student is unsure (its best-worst margin among the smallest rank.uncertain_fraction);
    # elsewhere the student's own best vs worst (rank.confident_pairs) or no pair
    uncertain = "uncertain"


class ServedApi(StrEnum):
    """How a served teacher (teacher.served.base_url set) is asked, tsalign/engines/scoring/served."""

    chat = "chat"  # pairwise judge on an OpenAI-compatible /v1/chat/completions
    classify = "classify"  # reward model on vLLM's /classify (server started with --runner pooling)
    score = "score"  # cross-encoder reward model on vLLM's /score (prompt and response as a sentence pair)
    openrlhf = "openrlhf"  # OpenRLHF's remote reward model: POST {"query": [texts]} -> {"rewards": [...]}


class BudgetScope(StrEnum):
    iteration = "iteration"  # rank.max_calls per iteration
    experiment = "experiment"  # rank.max_calls over all iterations of the experiment (earlier ranks' calls count)


class CutAnswers(StrEnum):
    """What rank does with candidates cut at sampler.max_new_tokens (finish_reason "length")."""

    rejected_only = "rejected_only"  # never chosen (DPO would teach ending mid-sentence), may be rejected
    keep = "keep"  # treated like complete answers


class Correction(StrEnum):
    """TSO's preference correction: where a pair holds the prompt's reference answer (a human's or a stronger
    model's, generate.references) against a policy answer, that label says the reference wins."""

    none = "none"  # the teacher's verdict stands
    override = "override"  # a verdict against the label is flipped (the reference becomes chosen)
    filter = "filter"  # a verdict against the label makes no pair


class DistillSource(StrEnum):
    teacher = "teacher"  # this iteration's teacher pairs
    human = "human"  # human preference pairs (distill.human_data)


class Replay(StrEnum):
    all = "all"
    last = "last"
    none = "none"


class Reference(StrEnum):
    previous = "previous"  # pi_t
    initial = "initial"  # pi_0


class PdistillLoss(StrEnum):
    """pdistill.loss: what the student learns from the aligned teacher (tsalign/algorithms/policy_losses.py)."""

    dckd = "dckd"  # SFT on chosen + KL(teacher || student) on chosen and rejected
    adpa = "adpa"  # SFT on chosen + the teacher's advantage over its reference on the student's greedy answers
    adpa_dckd = "adpa_dckd"  # ADPA started from the DCKD student (the paper's ADPA+, its best)


class AdvantageClip(StrEnum):
    none = "none"  # A = log pi_aligned - log pi_ref, sign kept (the paper's idea)
    positive = "positive"  # max(A, 0): what the ADPA authors' released code ends up doing


class LoggerBackend(StrEnum):
    none = "none"
    wandb = "wandb"


class WandbMode(StrEnum):
    """logger.mode: the modes wandb.init accepts (wandb 0.31). null = offline unless WANDB_MODE says otherwise."""

    online = "online"
    offline = "offline"
    disabled = "disabled"
    shared = "shared"  # several processes write to one run


class PolicyFrom(StrEnum):
    """evaluate.policy_from: the stage whose iter_<t>/<stage>/policy is judged against pi_0."""

    dpo = "dpo"  # TS-Align, TSO
    pdistill = "pdistill"  # DCKD / ADPA's student


# dpo.loss_type is open (any TRL loss_type); this is the one tsalign adds (TSO's clipped sigmoid loss)
DUAL_CLIP = "dual_clip"

# Which kinds each model role accepts: checked once, in TsalignConfig.problems (tsalign/config/schema.py).
ROLE_KINDS = {
    "policy": (ModelKind.causal_lm,),
    "student": (ModelKind.reward_model,),
    "teacher": (ModelKind.reward_model, ModelKind.judge),
}
