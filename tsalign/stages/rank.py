"""rank: the student scores all K candidates; the teacher re-ranks a shortlist; pairs come out.

    tsalign stage=rank iteration=0                      # student best vs worst -> teacher (TS-Align)
    tsalign stage=rank iteration=0 rank.selection=all experiment_name=teacher_only rank.candidates_from=default
                                                        # teacher-only baseline on the same candidates

Writes iter_<t>/rank/scores.jsonl (every student score, every teacher score), pairs.jsonl (TRL's
conversational preference format + margin and provenance) and metrics.json. On a seeded share of the prompts
(rank.audit_fraction) the teacher also scores all K: the audit of the shortlist (tsalign.stages.audit).
"""

from __future__ import annotations

import collections
import math
import random
import statistics
from pathlib import Path

from omegaconf import DictConfig

from tsalign.algorithms.pairs import pairs_longer_wins
from tsalign.algorithms.selection import (
    correct,
    decide,
    shortlist,
    student_agrees,
)
from tsalign.algorithms.stats import describe
from tsalign.artifacts.store import (
    PartialRows,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
    read_manifest,
    stage_dir,
    verify_output,
)
from tsalign.config.choices import CutAnswers, ModelKind, Selection
from tsalign.engines.scoring.resumable import OpenOnce, score_resumably
from tsalign.engines.scoring.served import cost_line, cost_report, is_served, no_verdict_line
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.audit import run_audit
from tsalign.stages.checks import check_student, check_teacher
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.factory import open_scorer, student_base_dir, teacher_model_dir
from tsalign.stages.lineage import experiment_dir, finished_output, student_source
from tsalign.stages.teacher_plan import budget_error, budget_left, teacher_plan


def candidates_file(cfg: DictConfig) -> Path:
    source = cfg.rank.candidates_from
    if not source:
        return finished_output(cfg, cfg.iteration, "generate", "candidates.jsonl", "rank")
    other = Path(source) if Path(source).is_dir() else Path(cfg.paths.outputs) / source
    path = stage_dir(other, cfg.iteration, "generate") / "candidates.jsonl"
    if read_manifest(path.parent) is None:
        raise TsalignError(f"rank.candidates_from={source}: {path} is not a finished generate output")
    return verify_output(path)


def plan(cfg: DictConfig) -> Plan:
    candidates = candidates_file(cfg)
    student, label = student_source(cfg, cfg.iteration)
    inputs = {"candidates": candidates, **({"student": student} if student else {})}
    return Plan({**section(cfg, "student", "teacher", "rank", "seed"), "student_used": label}, inputs)


SAMPLE_ROWS = 20  # pairs shown as a table in wandb


def load_candidates(path: Path) -> list[dict]:
    rows = read_jsonl(path, "candidates file")
    for n, row in enumerate(rows, 1):
        cands = row.get("candidates")
        if not isinstance(row.get("prompt"), list) or not isinstance(cands, list) or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) for c in cands):
            raise TsalignError(f"{path}:{n}: not a candidates row (needs prompt messages and candidates[].text); "
                               "rerun `tsalign stage=generate` with redo=true")
    return rows


def teacher_partial(path: Path, stamp: dict) -> PartialRows:
    """The teacher's finished chunks, less prompts without a verdict (a served teacher's garbage, NaN): a
    rerun asks those again (the server may be fixed), never reuses 'no verdict' as final."""
    partial = PartialRows(path, "prompt_id", stamp)
    partial.rows = {k: r for k, r in partial.rows.items() if all(map(math.isfinite, r["scores"]))}
    return partial


def first_position_rate(stats: dict) -> float | None:
    """How often a single-order verdict picked the first slot, over verdicts given (garbage gives none)."""
    picks = stats.pop("first_position_picks", 0)
    verdicts = round(stats["calls"] - stats.get("garbage", 0))
    return picks / verdicts if verdicts > 0 else None


def check_some_verdict(cfg: DictConfig, asked: list[int], teacher_scores: list[list[float]], stats: dict,
                       scorer) -> None:
    """A served teacher that gave no verdict on any prompt answered garbage only (a wrong URL, a web page, a
    judge that names no choice): that is an error naming the server, not a rank of 0 pairs."""
    if not asked or not is_served(cfg.teacher) or any(all(map(math.isfinite, teacher_scores[i])) for i in asked):
        return
    url = getattr(scorer, "url", cfg.teacher.served.base_url)
    raise TsalignError(no_verdict_line(url, len(asked), stats, getattr(scorer, "garbage_kinds", {})))


def keep_finished(cfg: DictConfig, ctx: StageContext, no_pair: dict) -> None:
    """A redo that made no pair never replaces a finished rank that has pairs, unless redo_allow_empty=true."""
    final = stage_dir(experiment_dir(cfg), cfg.iteration, "rank")
    if cfg.get("redo_allow_empty") or Path(ctx.directory).resolve() == final.resolve():
        return  # asked for, or not a redo of a finished stage
    had = ((read_manifest(final) or {}).get("counts") or {}).get("pairs") or 0
    if had:
        raise TsalignError(f"this redo of iter_{cfg.iteration}/rank made 0 pairs (no_pair: {no_pair}) where the "
                           f"finished one has {had}; it was kept: fix the cause, or add redo_allow_empty=true to "
                           "replace it")


def run(ctx: StageContext) -> StageResult:
    teacher = OpenOnce(lambda: open_scorer(ctx.cfg, ctx.cfg.teacher, teacher_model_dir(ctx.cfg)))
    try:  # one teacher for the shortlist and the audit
        return rank(ctx, teacher)
    finally:
        teacher.close()


def rank(ctx: StageContext, teacher: OpenOnce) -> StageResult:
    cfg, out_dir = ctx.cfg, ctx.directory
    rows = load_candidates(ctx.inputs["candidates"])
    ids = [r["prompt_id"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    texts = [[c["text"] for c in r["candidates"]] for r in rows]
    strategy, rng = Selection(cfg.rank.selection), random.Random(cfg.seed + cfg.iteration)
    student_label = ctx.plan.config["student_used"]
    student_dir = ctx.inputs.get("student") or student_base_dir(cfg)
    student_scores, student_stats = score_resumably(
        lambda: open_scorer(cfg, cfg.student, student_dir), ids, prompts, texts,
        PartialRows(out_dir / "_work" / "student.partial.jsonl", "prompt_id", ctx.stamp), f"student {student_label}")
    complete = [[c.get("finish_reason") != "length" for c in r["candidates"]]
                if cfg.rank.cut_answers == CutAnswers.rejected_only else None for r in rows]
    shortlists = [shortlist(t, s, strategy, cfg.rank.shortlist_m, rng, c)
                  for t, s, c in zip(texts, student_scores, complete)]

    teacher_scores: list[list[float]] = [[] for _ in rows]
    teacher_stats: dict = {"calls": 0, "seconds": 0.0, "truncated": 0}
    tplan = teacher_plan(cfg, strategy, student_scores, shortlists)
    asked = tplan.asked
    if asked:
        verdicts, teacher_stats = score_resumably(
            teacher, [ids[i] for i in asked], [prompts[i] for i in asked],
            [[texts[i][k] for k in shortlists[i]] for i in asked],
            teacher_partial(out_dir / "_work" / "teacher.partial.jsonl", ctx.stamp), f"teacher {cfg.teacher.name}")
        for i, v in zip(asked, verdicts):
            teacher_scores[i] = v
        check_some_verdict(cfg, asked, teacher_scores, teacher_stats, teacher.scorer)
        if cfg.teacher.kind == ModelKind.judge:
            teacher_stats["first_position_rate"] = first_position_rate(teacher_stats)

    audit, audit_scores = run_audit(ctx, ids, prompts, texts, student_scores, shortlists, set(tplan.by_student),
                                    complete, teacher)
    score_rows, pairs, no_pair, agreement = [], [], {"too_few_distinct": 0, "tie": 0, "no_complete_answer": 0,
                                                 "cut_preferred": 0, "over_budget": 0, "no_verdict": 0}, []
    sources = [[c.get("source", "policy") for c in r["candidates"]] for r in rows]
    corrections = {"agreed": 0, "overridden": 0, "filtered": 0}
    for i, row in enumerate(rows):
        by_student = i in tplan.by_student
        judge = [student_scores[i][k] for k in shortlists[i]] if by_student else teacher_scores[i]
        # a served teacher that answered garbage gives NaN: no verdict, never a made-up one
        usable = bool(shortlists[i]) and len(judge) == len(shortlists[i]) and all(map(math.isfinite, judge))
        verdict = decide(shortlists[i], judge, cfg.rank.tie_threshold, complete[i]) if usable else None
        if not shortlists[i]:
            no_pair["too_few_distinct"] += 1
        elif i in tplan.skipped:
            no_pair[tplan.skipped[i]] = no_pair.get(tplan.skipped[i], 0) + 1
        elif not usable:
            no_pair["no_verdict"] += 1
        elif verdict is None and complete[i] is not None and not any(complete[i][k] for k in shortlists[i]):
            no_pair["no_complete_answer"] += 1
        elif verdict is None and decide(shortlists[i], judge, cfg.rank.tie_threshold):
            no_pair["cut_preferred"] += 1  # the judge's favourite was cut at max_new_tokens
        elif verdict is None:
            no_pair["tie"] += 1
        score_rows.append({"prompt_id": row["prompt_id"], "student_scores": student_scores[i],
                           "shortlist": shortlists[i], "teacher_scores": teacher_scores[i] if usable and not by_student
                           else [], "decided_by": "student" if by_student else "teacher" if i in asked else None,
                           "chosen": verdict.chosen if verdict else None,
                           "rejected": verdict.rejected if verdict else None,
                           **({"audit_teacher_scores": audit_scores[i]} if i in audit_scores else {})})
        if verdict is None:
            continue
        verdict, corrected = correct(verdict, sources[i], cfg.rank.correction)
        if corrected:
            corrections[corrected] += 1
            score_rows[-1]["correction"] = corrected
        if verdict is None:
            no_pair["against_label"] = no_pair.get("against_label", 0) + 1
            continue
        if not by_student:  # the student trivially agrees with its own pairs
            agreement.append(student_agrees(student_scores[i], verdict))
        pairs.append({
            "prompt_id": row["prompt_id"], "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": texts[i][verdict.chosen]}],
            "rejected": [{"role": "assistant", "content": texts[i][verdict.rejected]}],
            "margin": verdict.margin, "chosen_index": verdict.chosen, "rejected_index": verdict.rejected,
            "iteration": cfg.iteration, "selection": strategy, "judge": cfg.student.name
            if by_student else cfg.teacher.name, "student": student_label,
            "rejected_cut": rows[i]["candidates"][verdict.rejected].get("finish_reason") == "length",
            "chosen_cut": rows[i]["candidates"][verdict.chosen].get("finish_reason") == "length",
            "chosen_source": sources[i][verdict.chosen], "rejected_source": sources[i][verdict.rejected],
        })

    metrics = {
        "prompts": len(rows), "candidates": sum(len(t) for t in texts), "pairs": len(pairs),
        "no_pair": no_pair, "selection": strategy, "cut_answers": cfg.rank.cut_answers,
        "candidates_cut": sum(c.get("finish_reason") == "length" for r in rows for c in r["candidates"]),
        "pairs_rejected_cut": sum(p["rejected_cut"] for p in pairs), "pairs_chosen_cut": sum(p["chosen_cut"] for p in pairs),
        "student_calls": student_stats["calls"], "teacher_calls": teacher_stats["calls"],
        "teacher_fraction_seen": sum(len(shortlists[i]) for i in asked) / max(sum(len(t) for t in texts), 1),
        "teacher_prompts": len(asked), "student_decided": len(tplan.by_student), "teacher_budget": tplan.budget,
        "student_teacher_agreement": statistics.fmean(agreement) if agreement else None,
        "agreement_pairs": len(agreement),
        "student_s": round(student_stats["seconds"], 2), "teacher_s": round(teacher_stats["seconds"], 2),
        "truncated": {"student": student_stats["truncated"], "teacher": teacher_stats.get("truncated", 0)},
        "student_scores": describe([s for ss in student_scores for s in ss]),
        "teacher_scores": describe([s for ts in teacher_scores for s in ts if math.isfinite(s)]),
        "mean_margin": statistics.fmean(p["margin"] for p in pairs) if pairs else None,
        "chosen_longer_rate": pairs_longer_wins(pairs) if pairs else None,
        "correction": {"mode": cfg.rank.correction, **corrections},
        "pair_sources": dict(collections.Counter(f"{p['chosen_source']}>{p['rejected_source']}" for p in pairs)),
        **audit,
    }
    if not pairs:
        keep_finished(cfg, ctx, no_pair)
    if is_served(cfg.teacher):
        metrics["served"] = cost_report(teacher_stats, cfg.teacher.served)
        if teacher.scorer:  # this run's garbage by kind, and the questions whose earlier answer was garbage
            metrics["served_garbage"] = {"kinds": {k: c for k, (c, _) in teacher.scorer.garbage_kinds.items()},
                                         "asked_again": teacher.scorer.stats["asked_again"]}
        say(f"[rank] {cost_line(metrics['served'])}")
    if "first_position_rate" in teacher_stats:
        rate = metrics["judge_first_position_rate"] = teacher_stats["first_position_rate"]
        if rate is not None and abs(rate - 0.5) > 0.4:
            say(f"[rank] warning: the judge picked the first slot in {rate:.0%} of single-order verdicts: it "
                  "answers by position, so its pairs carry little signal (both orders are averaged)")
    outputs = {"scores": atomic_write_jsonl(out_dir / "scores.jsonl", score_rows),
               "pairs": atomic_write_jsonl(out_dir / "pairs.jsonl", pairs),
               "metrics": atomic_write_json(out_dir / "metrics.json", metrics)}
    ctx.tracker.log({f"rank/{k}": v for k, v in metrics.items()})
    ctx.tracker.table("rank/pairs_sample", [
        {"prompt": p["prompt"][-1]["content"], "chosen": p["chosen"][0]["content"],
         "rejected": p["rejected"][0]["content"], "margin": p["margin"],
         "student_chosen": student_scores[i][p["chosen_index"]], "student_rejected": student_scores[i][p["rejected_index"]]}
        for i, p in [(ids.index(p["prompt_id"]), p) for p in pairs[:SAMPLE_ROWS]]])
    if cfg.rank.correction != "none":
        say(f"[rank] preference correction ({cfg.rank.correction}): verdicts on labelled pairs {corrections}")
    agree = metrics["student_teacher_agreement"]
    say(f"[rank] {len(pairs)} pairs from {len(rows)} prompts ({no_pair}), teacher calls {teacher_stats['calls']}"
          f" (student {student_stats['calls']}), agreement {'n/a' if agree is None else f'{agree:.2f}'}")
    counts = {k: metrics[k] for k in ("prompts", "candidates", "pairs", "student_calls", "teacher_calls",
                                      "student_teacher_agreement", "student_s", "teacher_s")}
    counts.update({k: metrics[k] for k in ("served", "audit_teacher_calls", "audit_sent_share", "audit_random_share")
                   if k in metrics})
    return StageResult(counts, outputs, {"no_pair": no_pair})


def candidates_per_prompt(cfg: DictConfig) -> tuple[int | None, Path]:
    """K of the candidates rank reads, from their generate manifest."""
    from tsalign.stages.rank import candidates_file

    path = candidates_file(cfg)
    config = (read_manifest(path.parent) or {}).get("config", {})
    return config.get("generate", {}).get("num_candidates"), path


def check(cfg: DictConfig) -> None:
    k, path = candidates_per_prompt(cfg)
    r = cfg.rank
    teacher_only = r.selection != Selection.student_only and not (r.selection == Selection.uncertain
                                                                      and r.confident_pairs)
    spent, available = budget_left(cfg)
    if teacher_only and available == 0:  # every pair would need the teacher, and the budget pays for none
        raise budget_error(cfg, spent)
    if k is not None and k < 2:
        raise TsalignError(f"rank needs at least 2 candidates per prompt to make a pair, and {path} has K={k}: rerun "
                           f"`tsalign stage=generate iteration={cfg.iteration} generate.num_candidates=4 redo=true`")
    check_student(cfg, student_source(cfg, cfg.iteration)[0], "student.max_length", cfg.student.max_length)
    if cfg.rank.selection != Selection.student_only or cfg.rank.audit_fraction > 0:
        check_teacher(cfg)


STAGE = Stage("rank", plan, run, check)
