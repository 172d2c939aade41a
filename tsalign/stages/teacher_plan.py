"""Which prompts rank asks the teacher about, within its budget (rank.selection, rank.max_calls,
rank.budget_scope): the teacher's plan, made before the teacher is opened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from tsalign.algorithms.selection import most_uncertain, student_margin, teacher_calls, within_budget
from tsalign.artifacts.store import read_manifest, stage_dir
from tsalign.config.choices import BudgetScope, ModelKind, Selection
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.lineage import experiment_dir


@dataclass
class TeacherPlan:
    """Who decides each prompt with a shortlist: the teacher (`asked`, in the order it is asked), the
    student's own order (`by_student`), or nobody (`skipped`: prompt -> the no_pair reason)."""

    asked: list[int] = field(default_factory=list)
    by_student: set[int] = field(default_factory=set)
    skipped: dict[int, str] = field(default_factory=dict)
    budget: dict | None = None


def calls_before(cfg: DictConfig) -> int:
    """Teacher calls of this experiment's finished ranks at earlier iterations (budget_scope=experiment)."""
    manifests = (read_manifest(stage_dir(experiment_dir(cfg), s, "rank")) for s in range(cfg.iteration))
    return sum((m or {}).get("counts", {}).get("teacher_calls") or 0 for m in manifests)


def budget_left(cfg: DictConfig) -> tuple[int, int | None]:
    """(teacher calls spent before, calls this rank may make: None without a budget)."""
    r = cfg.rank
    spent = calls_before(cfg) if r.max_calls is not None and r.budget_scope == BudgetScope.experiment else 0
    return spent, None if r.max_calls is None else max(r.max_calls - spent, 0)


def budget_error(cfg: DictConfig, spent: int, why: str = "") -> TsalignError:
    """A budget that pays for no teacher call: distill and dpo would only find an empty pairs file."""
    r = cfg.rank
    before = f" ({spent} spent before iteration {cfg.iteration}, budget_scope={r.budget_scope})" if spent else ""
    return TsalignError(f"rank.max_calls={r.max_calls}{before}{why}: the teacher was asked nothing and no pair was "
                        "made; raise rank.max_calls or use rank.selection=student_only")


def teacher_plan(cfg: DictConfig, strategy: Selection, student_scores: list[list[float]],
                 shortlists: list[list[int]]) -> TeacherPlan:
    """Which prompts the teacher is asked about: all shortlists (best_worst...), the least sure ones first
    (uncertain), none (student_only); then only as many as rank.max_calls pays for."""
    candidates = [i for i, s in enumerate(shortlists) if s]
    if strategy is Selection.student_only:
        return TeacherPlan(by_student=set(candidates))
    plan, order = TeacherPlan(), candidates
    if strategy is Selection.uncertain:
        order = most_uncertain([student_margin(s, k) for s, k in zip(student_scores, shortlists)],
                               cfg.rank.uncertain_fraction)
        confident = sorted(set(candidates) - set(order))
        if cfg.rank.confident_pairs:
            plan.by_student = set(confident)
        else:
            plan.skipped.update((i, "student_confident") for i in confident)
    r = cfg.rank
    costs = {i: teacher_calls(len(shortlists[i]), cfg.teacher.kind == ModelKind.judge) for i in order}
    spent, available = budget_left(cfg)
    plan.asked, over = within_budget(costs, order, available)
    if over and not plan.asked and not plan.by_student:  # before the teacher is opened: nothing would come of it
        raise budget_error(cfg, spent, f" pays for none of {len(over)} prompts (the cheapest costs "
                                       f"{min(costs[i] for i in over)} teacher calls)" if available else "")
    plan.skipped.update((i, "over_budget") for i in over)
    if r.max_calls is not None:
        plan.budget = {"max_calls": r.max_calls, "scope": r.budget_scope, "spent_before": spent,
                       "available": available, "planned": sum(costs[i] for i in plan.asked),
                       "prompts_over_budget": len(over)}
        if over:
            say(f"[rank] teacher budget: rank.max_calls={r.max_calls} ({r.budget_scope}, {spent} spent before) "
                  f"pays for {len(plan.asked)} of {len(order)} prompts; the other {len(over)} make no pair")
    return plan
