"""Every stage's facts in one place. The runner, the loop, the CLI, the checks, status, the report, the
plan and the multi-process rules read them here; nothing else lists stages. Importable without torch: a
stage's module is imported only when the stage runs (`spec.load()`).

To add a stage: write tsalign/stages/<name>.py ending in `STAGE = Stage(name, plan, run, check)`, describe
it below, add `<name>` to tsalign.config.choices.Stage and conf/stage/<name>.yaml (tests/test_registry.py
fails until all four agree).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One figure of a finished stage in the loop's summary and the report: `keys` of its manifest counts,
    shown as a value, `value [low, high]` (interval) or `before -> after` (change)."""

    label: str
    keys: tuple[str, ...]
    shape: str = "value"


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # where `STAGE = Stage(...)` lives
    outputs: tuple[str, ...]  # what run() writes in the stage folder (manifest["outputs"]); the first is written last
    work: tuple[str, ...] = ()  # resume state in <stage>/_work/ (a persisted format: tsalign/artifacts/FORMAT.md)
    in_loop: bool = True  # part of stage=loop's pipeline, in the order listed here
    multi_process: bool = False  # may run under `accelerate launch` (one process per device)
    trains: bool = False  # trains one model copy per process: a plain run on several GPUs keeps one of them
    status_counts: tuple[str, ...] = ()  # counts `tsalign stage=status` shows for a finished stage
    summary: tuple[Column, ...] = ()

    def load(self):
        """The stage's contract object (tsalign.stages.contract.Stage); imports its module (and torch) now."""
        return importlib.import_module(self.module).STAGE


STAGES = (
    StageSpec("generate", "tsalign.stages.generate", ("candidates.jsonl",),
              work=("candidates*.partial.jsonl",), multi_process=True,
              status_counts=("prompts", "candidates", "cut_at_max_new_tokens", "tokens_per_s"),
              summary=(Column("tok/s", ("tokens_per_s",)),)),
    StageSpec("rank", "tsalign.stages.rank", ("pairs.jsonl", "scores.jsonl", "metrics.json"),
              work=("student.partial.jsonl", "teacher.partial.jsonl", "audit.partial.jsonl"),
              status_counts=("pairs", "teacher_calls", "student_teacher_agreement", "audit_sent_share",
                             "audit_random_share"),
              summary=(Column("pairs", ("pairs",)), Column("teacher_calls", ("teacher_calls",)),
                       Column("teacher_cost", ("teacher_cost",)),
                       Column("agreement_rank", ("student_teacher_agreement",)),
                       Column("share_sent [95%]", ("audit_sent_share", "audit_sent_share_ci_low",
                                                   "audit_sent_share_ci_high"), "interval"),
                       Column("share_random", ("audit_random_share",)),
                       Column("holds_best+worst", ("audit_has_both",)),
                       Column("spearman [95%]", ("audit_spearman", "audit_spearman_ci_low", "audit_spearman_ci_high"),
                              "interval"))),
    StageSpec("distill", "tsalign.stages.distill", ("student", "metrics.json"), multi_process=True, trains=True,
              status_counts=("train_pairs", "agreement_before", "agreement_after"),
              summary=(Column("agreement_distill", ("agreement_before", "agreement_after"), "change"),
                       Column("student_human", ("human_accuracy_before", "human_accuracy_after"), "change"),
                       Column("longer_wins", ("human_longer_wins",)),
                       Column("student_labels_auc", ("human_labels_auc_before", "human_labels_auc_after"), "change"))),
    StageSpec("dpo", "tsalign.stages.dpo", ("policy",), work=("checkpoints/checkpoint-*", "checkpoints.config"),
              multi_process=True, trains=True, status_counts=("steps", "first_loss", "last_loss"),
              summary=(Column("dpo_loss", ("first_loss", "last_loss"), "change"), Column("dpo_loss_mean", ("train_loss",)))),
    StageSpec("evaluate", "tsalign.stages.evaluate", ("metrics.json", "judgements.jsonl", "plot"),
              work=("policy_answers.jsonl",),
              status_counts=("n", "win_rate", "ci_low", "ci_high", "student_agreement"),
              summary=(Column("win_rate [95%]", ("win_rate", "ci_low", "ci_high"), "interval"), Column("n", ("n",)),
                       Column("lc_win_rate", ("lc_win_rate",)), Column("control", ("control_win_rate",)),
                       Column("control_passed", ("control_passed",)),
                       Column("agreement_distilled", ("student_agreement",)))),
    StageSpec("pdistill", "tsalign.stages.pdistill", ("policy",), in_loop=False,
              trains=True, status_counts=("pairs", "steps", "teacher_calls"),
              summary=(Column("pdistill_loss", ("first_loss", "last_loss"), "change"),
                       Column("pdistill_teacher_calls", ("teacher_calls",)))),
)
REGISTRY: dict[str, StageSpec] = {s.name: s for s in STAGES}
PIPELINE: tuple[str, ...] = tuple(s.name for s in STAGES if s.in_loop)
MULTI_PROCESS: tuple[str, ...] = tuple(s.name for s in STAGES if s.multi_process)


def spec(name: str) -> StageSpec:
    return REGISTRY[str(name)]
