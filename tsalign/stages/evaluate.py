"""evaluate: pi_{t+1} (iteration t's DPO output) vs the base policy pi_0 on held-out prompts.

    tsalign stage=evaluate iteration=0

Both policies answer every held-out prompt once with the same sampling config and seed; the
judge (the teacher, or an independent one: evaluate.judge=<conf/teacher option>) judges each pair: win / tie / loss, win rate (ties half) with an interval, the paired
difference of teacher reward, and the student_{t+1}'s agreement with the teacher on these fresh
pairs. A control (pi_0 with another seed vs pi_0) must sit near 50%: if not, the judge is biased.
Writes metrics.json and progress.png (every evaluated iteration of the experiment so far).
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.artifacts import (
    PartialRows,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    config_hash,
    fingerprint,
    read_manifest,
)
from tsalign.engines import open_sampler, open_scorer, sampling_params, teacher_model_dir, teacher_option
from tsalign.lineage import base_model_dir, experiment_dir, finished_output, prompt_split
from tsalign.sampling.resumable import chunk_prompts, sample_rows
from tsalign.selection import Verdict, student_agrees
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stats import longer_wins_rate, mean_interval, outcome, win_rate


def judge_spec(cfg: DictConfig) -> DictConfig:
    return teacher_option(cfg.evaluate.judge) if cfg.evaluate.judge else cfg.teacher


def plan(cfg: DictConfig) -> Plan:
    t = cfg.iteration
    inputs = {"policy": finished_output(cfg, t, "dpo", "policy", "evaluate"),
              "student": finished_output(cfg, t, "distill", "student", "evaluate")}
    judge = OmegaConf.to_container(judge_spec(cfg), resolve=True)
    return Plan({**section(cfg, "policy", "teacher", "student", "sampler", "data", "evaluate"), "judge": judge}, inputs)


def answers(cfg: DictConfig, model_dir: Path, prompts: list[dict], runs: list[tuple[int, Path]]) -> list[list[str]]:
    """One answer per prompt for each (seed, cache) run, from one model loaded at most once; finished
    chunks are kept in each cache (pi_0's answers are shared by the iterations)."""
    model = fingerprint(model_dir)
    sampler, out = None, []
    try:
        for seed, cache in runs:
            params = sampling_params(cfg, 1, seed)
            partial = PartialRows(cache, "prompt_id", {"model": model, "params": params.as_dict()})
            if not all(p["prompt_id"] in partial for p in prompts):
                sampler = sampler or open_sampler(cfg, model_dir, seed)
                sample_rows(sampler, prompts, params, partial, model_dir.name, chunk_prompts(cfg.sampler.batch_size, 1))
            out.append([partial.rows[p["prompt_id"]]["candidates"][0]["text"] for p in prompts])
    finally:
        if sampler is not None:
            sampler.close()
    return out


def compare(prompts: list[list[dict]], policy: list[str], base: list[str], judge, tie: float,
            confidence: float) -> dict:
    scores = judge.score_groups(prompts, [[a, b] for a, b in zip(policy, base)])
    deltas = [s[0] - s[1] for s in scores]
    outcomes = [outcome(d, tie) for d in deltas]
    mean_delta, low, high = mean_interval(deltas, confidence)
    decided = [(a, b) if o == 1.0 else (b, a) for o, a, b in zip(outcomes, policy, base) if o != 0.5]
    return {**win_rate(outcomes, confidence), "scores": scores, "reward_delta": mean_delta, "reward_delta_ci": [low, high],
            "policy_reward": statistics.fmean(s[0] for s in scores), "base_reward": statistics.fmean(s[1] for s in scores),
            "longer_wins_rate": longer_wins_rate([len(w) for w, _ in decided], [len(lo) for _, lo in decided])
            if decided else None}


def progress_plot(experiment: Path, current: dict, iteration: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {iteration: current}
    for m in experiment.glob("iter_*/evaluate/metrics.json"):
        t = int(m.parent.parent.name.split("_")[1])
        if t != iteration and read_manifest(m.parent):
            points[t] = json.loads(m.read_text())
    its = sorted(points)
    x = [t + 1 for t in its]  # iteration t's evaluate judges pi_{t+1}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    wr = [points[t]["win_rate"] for t in its]
    err = [[w - points[t]["ci_low"] for w, t in zip(wr, its)], [points[t]["ci_high"] - w for w, t in zip(wr, its)]]
    axes[0].errorbar(x, wr, yerr=err, marker="o", capsize=4)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].set(title=f"win rate vs pi_0 ({current['judge']})", xlabel="policy pi_t", ylim=(0, 1))
    axes[1].plot(x, [points[t]["student_agreement"] for t in its], marker="o")
    axes[1].set(title="student-judge agreement", xlabel="student_t", ylim=(0, 1))
    axes[2].plot(x, [points[t]["policy_reward"] for t in its], marker="o", label="pi_t")
    axes[2].plot(x, [points[t]["base_reward"] for t in its], marker="s", label="pi_0")
    axes[2].set(title="mean judge score", xlabel="policy pi_t")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(x)
    fig.suptitle(f"{experiment.name}: n={current['n']} held-out prompts")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(out, png.getvalue())


def run(ctx: StageContext) -> StageResult:
    cfg, out_dir, tracker = ctx.cfg, ctx.directory, ctx.tracker
    t, e = ctx.iteration, cfg.evaluate
    held_out, _ = prompt_split(cfg)
    policy_dir = ctx.inputs["policy"]
    base_dir = base_model_dir(cfg, cfg.policy)
    shared = experiment_dir(cfg) / "_eval_answers"
    key = config_hash([section(cfg, "policy", "sampler", "data"), e.seed])
    base_runs = [(e.seed, shared / f"base-{key}.jsonl")] + ([(e.seed + 1, shared / f"control-{key}.jsonl")]
                                                            if e.control else [])
    base, *rest = answers(cfg, base_dir, held_out, base_runs)
    control = rest[0] if rest else None
    (policy,) = answers(cfg, policy_dir, held_out, [(e.seed, out_dir / "_work" / "policy_answers.jsonl")])

    prompts = [p["messages"] for p in held_out]
    spec = judge_spec(cfg)
    judge = open_scorer(cfg, spec, teacher_model_dir(cfg, spec))
    main = compare(prompts, policy, base, judge, e.tie_threshold, e.confidence)
    ctrl = compare(prompts, control, base, judge, e.tie_threshold, e.confidence) if control else None
    judge.close()

    student = open_scorer(cfg, cfg.student, ctx.inputs["student"])
    student_scores = student.score_groups(prompts, [[a, b] for a, b in zip(policy, base)])
    student.close()
    agree = [student_agrees(s, Verdict(0, 1, 0.0) if m[0] > m[1] else Verdict(1, 0, 0.0))
             for s, m in zip(student_scores, main["scores"]) if m[0] != m[1]]

    metrics = {k: v for k, v in main.items() if k != "scores"}
    metrics.update(policy=f"pi_{t + 1}", judge=spec.name, judge_is_teacher=not cfg.evaluate.judge,
                   student_agreement=statistics.fmean(agree) if agree else None,
                   agreement_pairs=len(agree), control=None if ctrl is None else
                   {k: v for k, v in ctrl.items() if k in ("n", "win", "tie", "loss", "win_rate", "ci_low", "ci_high")},
                   mean_length={"policy": statistics.fmean(map(len, policy)), "base": statistics.fmean(map(len, base))},
                   empty_answers={"policy": sum(not a.strip() for a in policy), "base": sum(not a.strip() for a in base)})
    rows = [{"prompt_id": p["prompt_id"], "policy": a, "base": b, "judge": m, "student": s}
            for p, a, b, m, s in zip(held_out, policy, base, main["scores"], student_scores)]
    outputs = {"metrics": atomic_write_json(out_dir / "metrics.json", metrics),
               "judgements": atomic_write_jsonl(out_dir / "judgements.jsonl", rows)}
    outputs["plot"] = progress_plot(experiment_dir(cfg), metrics, t, out_dir / "progress.png")
    tracker.log({f"evaluate/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctrl_txt = f"; control (pi_0 vs pi_0) {ctrl['win_rate']:.2f}" if ctrl else ""
    print(f"[evaluate] pi_{t + 1} vs pi_0 on {metrics['n']} held-out prompts, judged by {spec.name}: win {metrics['win']} / tie "
          f"{metrics['tie']} / loss {metrics['loss']}, win rate {metrics['win_rate']:.2f} "
          f"[{metrics['ci_low']:.2f}, {metrics['ci_high']:.2f}]{ctrl_txt}; student agreement "
          f"{metrics['student_agreement'] if metrics['student_agreement'] is None else round(metrics['student_agreement'], 2)}")
    counts = {k: metrics[k] for k in ("n", "win", "tie", "loss", "win_rate", "ci_low", "ci_high", "student_agreement",
                                      "reward_delta", "policy_reward", "base_reward")}
    return StageResult(counts, outputs, {"plot": str(ctx.directory.parent / "evaluate" / "progress.png")})


STAGE = Stage("evaluate", plan, run)
