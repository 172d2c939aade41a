"""distill: student_{t+1} = student_t trained on the teacher's pairs (Bradley-Terry), plus replay.

    tsalign stage=distill iteration=0
    tsalign stage=distill iteration=0 distill.source=human      # fit a reward model on human pairs

A slice of this iteration's teacher pairs is held out; the student's agreement with the teacher on
it is reported before and after, beside the 'longer answer wins' rule; so is its accuracy on the human pairs
the teacher's fit held out, and its AUC on 300 human-labelled responses (distill.human_labels). Saves
iter_<t>/distill/student/, the HF checkpoint that iteration t+1's rank loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign import distributed
from tsalign.algorithms.audit import nested_pairs
from tsalign.algorithms.stats import auc, auc_change
from tsalign.artifacts.store import atomic_write_json, read_jsonl
from tsalign.config.choices import CutAnswers, DistillSource, Replay
from tsalign.data import load_human_labels, load_human_pairs, split_pairs
from tsalign.engines.models import pick_device
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.checks import check_student, check_teacher
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.factory import student_base_dir, teacher_model_dir
from tsalign.stages.lineage import finished_output, student_source
from tsalign.training.reward_model import fit_pairs, label_scores, pair_accuracy, train_reward_model


def replay_iterations(t: int, replay: str) -> list[int]:
    return {Replay.all: list(range(t)), Replay.last: [t - 1] if t > 0 else [], Replay.none: []}[Replay(replay)]


AUDIT_INPUTS = ("audit_scores", "audit_candidates")


def pair_files(cfg: DictConfig) -> dict[str, Path]:
    if cfg.distill.source == DistillSource.human:
        return {}
    files = {"pairs": finished_output(cfg, cfg.iteration, "rank", "pairs.jsonl", "distill")}
    if cfg.distill.audit_pairs:
        from tsalign.stages.rank import candidates_file

        files["audit_scores"] = finished_output(cfg, cfg.iteration, "rank", "scores.jsonl", "distill.audit_pairs")
        files["audit_candidates"] = candidates_file(cfg)
    for t in replay_iterations(cfg.iteration, cfg.distill.replay):
        files[f"replay_{t}"] = finished_output(cfg, t, "rank", "pairs.jsonl", f"distill replay of iteration {t}")
    return files


def reports_teacher_holdout(cfg: DictConfig) -> bool:
    """Distilling teacher pairs, the student is also scored on the human pairs the teacher's fit held out."""
    return cfg.distill.source == DistillSource.teacher and bool(cfg.teacher.fit.data)


def plan(cfg: DictConfig) -> Plan:
    student, label = student_source(cfg, cfg.iteration)
    inputs = {**pair_files(cfg), **({"student": student} if student else {})}
    # the human hold-out and the teacher's fit report come from the teacher's option: in the plan too
    keys = ("student", "distill", "seed") + (("teacher",) if reports_teacher_holdout(cfg) else ())
    return Plan({**section(cfg, *keys), "student_used": label}, inputs)


def audit_teacher_pairs(cfg: DictConfig, scores: Path, candidates: Path, left_out: set) -> list[dict]:
    """distill.audit_pairs: pairs from the teacher's all-K scores of rank's audited prompts, in rank's pair format;
    `left_out`: prompt ids of the held-out pairs (their agreement must stay a test the student did not train on)."""
    by_id = {r["prompt_id"]: r for r in read_jsonl(candidates, "candidates file")}
    pairs = []
    for row in read_jsonl(scores, "rank scores"):
        cands = (by_id.get(row["prompt_id"]) or {}).get("candidates")
        if "audit_teacher_scores" not in row or row["prompt_id"] in left_out or not cands:
            continue
        complete = [c.get("finish_reason") != "length" for c in cands] \
            if cfg.rank.cut_answers == CutAnswers.rejected_only else None
        for chosen, rejected, margin in nested_pairs(row["audit_teacher_scores"], complete):
            pairs.append({"prompt_id": row["prompt_id"], "prompt": by_id[row["prompt_id"]]["prompt"],
                          "chosen": [{"role": "assistant", "content": cands[chosen]["text"]}],
                          "rejected": [{"role": "assistant", "content": cands[rejected]["text"]}],
                          "margin": margin, "judge": cfg.teacher.name, "source": "audit"})
    return pairs


def human_anchor_pairs(cfg: DictConfig) -> list[dict]:
    """student_0's own fit pairs, mixed into a teacher distill (distill.human_anchor): never the held-out ones."""
    if cfg.distill.source != DistillSource.teacher or not (cfg.distill.human_anchor and cfg.student.fit.data):
        return []
    return fit_pairs(OmegaConf.to_container(cfg.student.fit), Path(cfg.paths.cache))[0]


def human_eval_pairs(cfg: DictConfig) -> list[dict]:
    """The human pairs the teacher's fit held out (when it has a fit recipe): a label source it never saw."""
    fit = cfg.teacher.fit
    return split_pairs(load_human_pairs(fit.data, cfg.paths.cache), fit.holdout, fit.seed)[1]


def labels_change(rows: list[dict], before: list[float], after: list[float], seed: int) -> dict:
    """The student's AUC on human-labelled responses before and after, the change's paired interval, and
    the AUC of response length (how much of it length alone explains)."""
    flags = [r["label"] for r in rows]
    return {"data": "human_labels", **auc_change(before, after, flags, seed=seed),
            "longer_auc": auc([float(len(r["response"])) for r in rows], flags)}


def labels_counts(labels: dict | None) -> dict:
    if labels is None:
        return {}
    return {"human_labels_rows": labels["rows"], "human_labels_auc_before": round(labels["before"], 4),
            "human_labels_auc_after": round(labels["after"], 4),
            "human_labels_auc_change_ci": [round(x, 4) for x in labels["change_ci"]],
            "human_labels_longer_auc": round(labels["longer_auc"], 4)}


def run(ctx: StageContext) -> StageResult:
    cfg, out_dir, tracker = ctx.cfg, ctx.directory, ctx.tracker
    d, device = cfg.distill, pick_device(cfg.device)
    files = {k: v for k, v in ctx.inputs.items() if k not in ("student", *AUDIT_INPUTS)}
    if d.source == DistillSource.human:
        train, held_out = split_pairs(load_human_pairs(d.human_data, cfg.paths.cache), d.holdout_fraction, cfg.seed)
        replayed = 0
    else:
        current = read_jsonl(files.pop("pairs"), "pairs file")
        train, held_out = split_pairs(current, float(d.holdout_fraction), cfg.seed + cfg.iteration)
        replay = [p for f in files.values() for p in read_jsonl(f, "pairs file")]
        train, replayed = train + replay, len(replay)
    audit = audit_teacher_pairs(cfg, *(ctx.inputs[k] for k in AUDIT_INPUTS), {p["prompt_id"] for p in held_out}) \
        if "audit_scores" in ctx.inputs else []
    train += audit
    anchor = human_anchor_pairs(cfg)
    train = train + anchor
    if not train:
        raise TsalignError(f"no pairs to distill at iteration {cfg.iteration}: rank mined none; "
                           "raise generate.num_candidates or data.prompts_per_iteration")

    student_dir = ctx.inputs.get("student") or student_base_dir(cfg)
    human = human_eval_pairs(cfg) if reports_teacher_holdout(cfg) else []

    # held-out figures on the main process only: the others do not save the student (so cannot load it
    # after training) and write no metrics
    main = distributed.is_main()

    def accuracy(model_dir: Path, pairs: list[dict], cache: Path | None = None) -> dict | None:
        return pair_accuracy(model_dir, pairs, d.max_length, device, cfg.student.seed, cache) if pairs and main else None

    def log_step(step: int, values: dict) -> None:
        tracker.log({f"distill/{k}": v for k, v in values.items()}, step=step)

    # the human sets are fixed: a student's scores on them are kept (the configured student's, every run's "before")
    fixed_sets = Path(cfg.paths.cache)
    labelled = load_human_labels(d.human_labels, cfg.paths.cache) if d.human_labels and main else []

    def scores(model_dir: Path) -> list[float]:
        return label_scores(model_dir, labelled, d.max_length, device, cfg.student.seed, fixed_sets) if labelled else []

    before, human_before = accuracy(student_dir, held_out), accuracy(student_dir, human, fixed_sets)
    labels_before = scores(student_dir)
    out = out_dir / "student"
    train_stats = train_reward_model(student_dir, out, train, epochs=d.epochs, batch_size=d.batch_size,
                                     learning_rate=d.learning_rate, max_length=d.max_length,
                                     seed=cfg.seed + cfg.iteration, init_seed=cfg.student.seed,
                                     use_margin=d.use_margin, device=device, on_step=log_step,
                                     lr_key="distill.learning_rate", what="distill", data_parallel=True)
    after, human_after = accuracy(out, held_out), accuracy(out, human, fixed_sets)
    labels = labels_change(labelled, labels_before, scores(out), cfg.seed) if labelled else None

    metrics = {"source": d.source, "train_pairs": len(train), "replayed_pairs": replayed, "audit_pairs": len(audit),
               "human_anchor_pairs": len(anchor), "held_out_pairs": len(held_out),
               "label": str(d.source), "before": before, "after": after,
               "train": train_stats, "human_held_out": {"before": human_before, "after": human_after},
               "human_labels": labels}
    if human:
        report = json.loads((teacher_model_dir(cfg) / "fit_report.json").read_text())
        metrics["human_held_out"]["teacher"] = report["held_out"]
    metrics_path = out_dir / "metrics.json"
    if distributed.is_main():
        atomic_write_json(metrics_path, metrics)
    def rounded(result: dict | None) -> float | None:
        return None if result is None else round(result["accuracy"], 4)

    counts = {"train_pairs": len(train), "audit_pairs": len(audit), "human_anchor_pairs": len(anchor),
              "held_out_pairs": len(held_out),
              "steps": train_stats["steps"],
              "agreement_before": rounded(before), "agreement_after": rounded(after),
              "human_accuracy_before": rounded(human_before), "human_accuracy_after": rounded(human_after),
              "human_longer_wins": None if human_before is None else round(human_before["longer_wins"], 4),
              "human_pairs": len(human), **labels_counts(labels)}
    tracker.log({f"distill/{k}": v for k, v in counts.items() if v is not None})
    say(f"[distill] {len(train)} pairs ({replayed} replayed, {len(audit)} from the audit, {len(anchor)} human anchor), "
          f"{train_stats['steps']} steps; held-out "
          f"{'teacher agreement' if d.source == DistillSource.teacher else 'human accuracy'} "
          f"{counts['agreement_before']} -> {counts['agreement_after']} on {len(held_out)} pairs"
          + (f"; human held-out {counts['human_accuracy_before']} -> {counts['human_accuracy_after']} on "
             f"{len(human)} pairs (longer answer wins: {counts['human_longer_wins']})" if human else "")
          + (f"; human-labelled responses AUC {labels['before']:.3f} -> {labels['after']:.3f} (change "
             f"[{labels['change_ci'][0]:+.3f}, {labels['change_ci'][1]:+.3f}]) on {labels['rows']} "
             f"(longer answer: {labels['longer_auc']:.3f})" if labels else ""))
    return StageResult(counts, {"student": out, "metrics": metrics_path}, {"student_from": str(student_dir)})


def check(cfg: DictConfig) -> None:
    check_student(cfg, student_source(cfg, cfg.iteration)[0], "distill.max_length", cfg.distill.max_length)
    if reports_teacher_holdout(cfg):
        check_teacher(cfg)


STAGE = Stage("distill", plan, run, check)
