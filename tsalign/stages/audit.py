"""rank's live audit of the student's shortlist: on a seeded sample of prompts (`rank.audit_fraction`) the teacher
also scores all K candidates, and rank's metrics say how much of the teacher's widest margin the pairs sent kept
against random pairs, how often the shortlist held the teacher's best and worst, and the student's Spearman
correlation with the teacher (tsalign.algorithms.audit), each with an interval.

Its teacher calls are counted apart (`audit_teacher_calls`, and `audit_served` for a served teacher): they are not
charged to rank.max_calls, and they never make pairs. Resumable like the rest of rank (_work/audit.partial.jsonl).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from omegaconf import DictConfig

from tsalign.algorithms.audit import audit_prompt, summarize, verdict_line
from tsalign.algorithms.selection import distinct_valid
from tsalign.artifacts.store import PartialRows
from tsalign.engines.scoring.resumable import score_resumably
from tsalign.engines.scoring.served import cost_report, is_served
from tsalign.progress import say
from tsalign.stages.contract import StageContext

AUDIT_WORK = "audit.partial.jsonl"


def audited(shortlists: list[list[int]], fraction: float, seed: int) -> list[int]:
    """Prompt indices the audit covers: a seeded sample of `fraction` of the prompts that have a shortlist (at
    least one when the fraction is above 0), in prompt order."""
    pool = [i for i, s in enumerate(shortlists) if s]
    if fraction <= 0 or not pool:
        return []
    n = min(len(pool), max(1, round(fraction * len(pool))))
    return sorted(random.Random(seed).sample(pool, n))


def run_audit(ctx: StageContext, ids: list[str], prompts: list, texts: list[list[str]], student: list[list[float]],
              shortlists: list[list[int]], by_student: set[int], complete: list[list[bool] | None],
              open_teacher: Callable) -> tuple[dict, dict]:
    """(figures for rank's metrics, {prompt index: teacher scores of all K, None where not distinct / no verdict}).
    `complete`: per prompt, False for answers cut at max_new_tokens (never chosen), or None (rank.cut_answers=keep)."""
    cfg: DictConfig = ctx.cfg
    chosen = audited(shortlists, cfg.rank.audit_fraction, cfg.seed * 1000 + cfg.iteration)
    if not chosen:
        return {}, {}
    pools = {i: distinct_valid(texts[i]) for i in chosen}
    scores, stats = score_resumably(
        open_teacher, [ids[i] for i in chosen], [prompts[i] for i in chosen],
        [[texts[i][k] for k in pools[i]] for i in chosen],
        PartialRows(ctx.directory / "_work" / AUDIT_WORK, "prompt_id", ctx.stamp), f"audit: teacher {cfg.teacher.name} on all K")
    all_k, audits = {}, []
    for i, verdicts in zip(chosen, scores):
        if len(verdicts) != len(pools[i]) or not all(map(math.isfinite, verdicts)):
            continue  # a served teacher's garbage: no verdict, not a made-up one
        teacher = dict(zip(pools[i], verdicts))
        all_k[i] = [teacher.get(k) for k in range(len(texts[i]))]
        audits.append(audit_prompt(pools[i], teacher, student[i], shortlists[i], i in by_student, complete[i]))
    figures = {**summarize(audits, seed=cfg.seed), "audit_teacher_calls": stats["calls"],
               "audit_teacher_s": round(stats["seconds"], 2)}
    if is_served(cfg.teacher):
        figures["audit_served"] = cost_report(stats, cfg.teacher.served)
    say(f"[rank] audit on {len(audits)} prompts ({stats['calls']} teacher calls, counted apart): "
        f"{audit_line(figures)}")
    line = verdict_line(figures)
    if line:
        say(f"[rank] warning: {line}")
    return figures, all_k


def _interval(figures: dict, key: str) -> str:
    value, low, high = figures.get(key), figures.get(f"{key}_ci_low"), figures.get(f"{key}_ci_high")
    if value is None:
        return "n/a"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if low is not None and not math.isnan(low) else f"{value:.2f}"


def audit_line(figures: dict) -> str:
    return (f"margin share sent {_interval(figures, 'audit_sent_share')} vs random "
            f"{_interval(figures, 'audit_random_share')}; shortlist holds the teacher's best "
            f"{_interval(figures, 'audit_has_best')}, worst {_interval(figures, 'audit_has_worst')}; "
            f"Spearman(student, teacher) {_interval(figures, 'audit_spearman')}")
