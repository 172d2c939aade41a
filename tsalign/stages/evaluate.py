"""evaluate: pi_{t+1} (iteration t's DPO output) vs the base policy pi_0 on held-out prompts.

    tsalign stage=evaluate iteration=0

Both policies answer every held-out prompt once with the same sampling config and seed; the
judge (the teacher, or an independent one: evaluate.judge=<conf/teacher option>) judges each pair: win / tie / loss, win rate (ties half) with an interval, the paired
difference of teacher reward, and the student_{t+1}'s agreement with the teacher on these fresh
pairs. A control (pi_0 with another seed vs pi_0) must sit near 50%, its longer answers must not win more often
(and, for a pairwise judge, neither slot): exact sign tests, which an unbiased judge fails in one run in twenty
at evaluate.confidence=0.95.
Writes metrics.json and progress.png (every evaluated iteration of the experiment so far).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tsalign.algorithms.selection import Verdict, student_agrees
from tsalign.algorithms.stats import (
    bootstrap_interval,
    control_checks,
    length_controlled_win_rate,
    longer_wins_rate,
    outcome,
    paired_win_rate,
)
from tsalign.artifacts.locks import cache_lock
from tsalign.artifacts.store import (
    PartialRows,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    config_hash,
    fingerprint,
    read_manifest,
)
from tsalign.engines.sampling.resumable import chunk_prompts, sample_runs
from tsalign.engines.scoring.served import cost_line, cost_report, is_served
from tsalign.errors import TsalignError
from tsalign.progress import progress, say
from tsalign.stages.checks import base_model, check_judge, check_lengths, check_sampler, trained_model
from tsalign.stages.contract import Plan, Stage, StageContext, StageResult, section
from tsalign.stages.factory import (
    judge_spec,
    open_sampler,
    open_scorer,
    sampling_params,
    teacher_model_dir,
)
from tsalign.stages.lineage import base_model_dir, experiment_dir, finished_output, prompt_split


def policy_stage(cfg: DictConfig) -> str:
    """The stage whose iter_<t>/<stage>/policy is judged (evaluate.policy_from)."""
    return str(cfg.evaluate.policy_from)


def plan(cfg: DictConfig) -> Plan:
    t = cfg.iteration
    inputs = {"policy": finished_output(cfg, t, policy_stage(cfg), "policy", "evaluate")}
    if policy_stage(cfg) == "dpo":  # TS-Align's student_{t+1} is scored beside the judge
        inputs["student"] = finished_output(cfg, t, "distill", "student", "evaluate")
    judge = OmegaConf.to_container(judge_spec(cfg), resolve=True)
    return Plan({**section(cfg, "policy", "teacher", "student", "sampler", "data", "evaluate"), "judge": judge}, inputs)


def answers(cfg: DictConfig, model_dir: Path, prompts: list[dict], runs: list[tuple[int, Path]]) -> list[list[str]]:
    """One answer per prompt for each (seed, cache) run, from one model loaded at most once, the runs sampled in one
    pass (sample_runs: they share its batches); finished chunks are kept in each cache (pi_0's answers are shared by
    the iterations)."""
    model = fingerprint(model_dir, cfg.paths.cache)  # pi_0, a base model: hashed once per machine
    sampler = None
    try:
        with contextlib.ExitStack() as locks:
            kept = []
            for seed, cache in runs:  # pi_0's caches are shared: one writer, the others reuse (always in this order)
                locks.enter_context(cache_lock(cache, "evaluation answers"))
                params = sampling_params(cfg, 1, seed)
                kept.append((params, PartialRows(cache, "prompt_id", {"model": model, "params": params.as_dict()})))
            if not all(p["prompt_id"] in partial for _, partial in kept for p in prompts):
                sampler = open_sampler(cfg, model_dir, runs[0][0])
                sample_runs(sampler, prompts, kept, model_dir.name, chunk_prompts(cfg.sampler.batch_size, 1))
            return [[partial.rows[p["prompt_id"]]["candidates"][0]["text"] for p in prompts] for _, partial in kept]
    finally:
        if sampler is not None:
            sampler.close()


def kept_answers_dir(cfg: DictConfig) -> Path:
    """Where pi_0's finished answers wait for the next experiment on this machine."""
    return Path(cfg.paths.cache) / "eval_answers"


def with_stamp(answers_file: Path) -> tuple[Path, Path]:
    """A PartialRows file and the config stamp beside it (model content and sampling params)."""
    return answers_file, answers_file.with_suffix(".config")


def adopt_kept(kept: Path, here: Path) -> bool:
    """pi_0's answers from the machine cache into this experiment, unless it has its own: another experiment made
    them with the same key (policy, sampler, data, seed, held-out prompts). The answers, then their stamp, each
    atomically: a torn copy lacks the stamp, and PartialRows then discards the answers and samples them again."""
    if here.exists() or not all(path.is_file() for path in with_stamp(kept)):
        return False
    for source, target in zip(with_stamp(kept), with_stamp(here)):
        atomic_write_bytes(target, source.read_bytes())
    return True


def keep(here: Path, kept: Path) -> bool:
    """This experiment's finished pi_0 answers into the machine cache for the next experiment: the answers first, the
    stamp last (answers beside an older stamp are discarded by whoever adopts them, never taken as the new ones).
    False when the cache held them already."""
    wrote = False
    for source, target in zip(with_stamp(here), with_stamp(kept)):
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
            wrote = True
    return wrote


def answers_key(cfg: DictConfig, prompts: list[dict]) -> str:
    """What names pi_0's answer files: the policy, sampler, data and seed, and the prompts' content (a prompt's id is
    its file and row: a file edited in place keeps them)."""
    return config_hash([section(cfg, "policy", "sampler", "data"), cfg.evaluate.seed,
                        [[p["prompt_id"], p["messages"]] for p in prompts]])


def base_answers(cfg: DictConfig, model_dir: Path, prompts: list[dict], runs: list[tuple[int, Path]]) -> tuple:
    """answers() for pi_0's runs, shared by every experiment on this machine through <cache>/eval_answers (the base
    policy answers the same prompts with the same seeds in every experiment of one config): adopted before, kept
    after (under the experiment's names: answers_key). Returns the answers and whether they came from the cache."""
    kept = {here: kept_answers_dir(cfg) / here.name for _, here in runs}
    adopted = []
    for here, there in kept.items():
        with cache_lock(there, "pi_0's evaluation answers"):
            adopted.append(adopt_kept(there, here))
    found, wrote = answers(cfg, model_dir, prompts, runs), []
    for here, there in kept.items():
        with cache_lock(there, "pi_0's evaluation answers"):
            wrote.append(keep(here, there))
    reused = all(adopted) and not any(wrote)
    if reused:
        say(f"[evaluate] pi_0's answers read from {kept_answers_dir(cfg)} (an earlier experiment's: "
            "the same policy, sampler, data, seed and prompts)")
    return found, reused


JUDGE_CHUNK = 32  # pairs per judge call: progress for a slow judge


def judge_pairs(prompts: list[list[dict]], a: list[str], b: list[str], judge,
                desc: str = "judging") -> tuple[list[list[float]], dict]:
    """The judge's [score(a), score(b)] per prompt, and its single-order first-slot picks while judging
    (pairwise judges count them; reward models do not)."""
    before = dict(judge.stats)
    scores = []
    with progress(len(prompts), desc, "pair") as bar:
        for start in range(0, len(prompts), JUDGE_CHUNK):
            end = start + JUDGE_CHUNK
            scores += judge.score_groups(prompts[start:end], [[x, y] for x, y in zip(a[start:end], b[start:end])])
            bar.update(len(prompts[start:end]))
    delta = {k: judge.stats.get(k, 0) - before.get(k, 0) for k in ("first_position_picks", "calls", "garbage")}
    # garbage answers (a served judge naming no choice) are calls without a verdict: no slot was picked
    picks = {"first_position_picks": delta["first_position_picks"], "verdicts": round(delta["calls"] - delta["garbage"])}
    return scores, picks if "first_position_picks" in judge.stats else {}


def comparison(scores: list[list[float]], policy: list[str], base: list[str], tie: float, confidence: float,
               seed: int) -> dict:
    """Win rate (ties half) and the paired reward difference with seeded bootstrap intervals over prompts,
    the length-controlled win rate, and how often the longer answer won."""
    deltas = [s[0] - s[1] for s in scores]
    outcomes = [outcome(d, tie) for d in deltas]
    low, high = bootstrap_interval(deltas, confidence=confidence, seed=seed)
    decided = [(len(a), len(b)) if o == 1.0 else (len(b), len(a)) for o, a, b in zip(outcomes, policy, base) if o != 0.5]
    return {**paired_win_rate(outcomes, confidence, seed),
            **length_controlled_win_rate(outcomes, [len(a) for a in policy], [len(b) for b in base], confidence, seed),
            "reward_delta": statistics.fmean(deltas), "reward_delta_ci": [low, high],
            "policy_reward": statistics.fmean(s[0] for s in scores), "base_reward": statistics.fmean(s[1] for s in scores),
            "longer_wins_rate": longer_wins_rate([w for w, _ in decided], [lo for _, lo in decided]) if decided else None,
            "outcomes": outcomes}


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
    for key, low, high, label, dx in (("win_rate", "ci_low", "ci_high", "raw", -0.04),
                                       ("lc_win_rate", "lc_ci_low", "lc_ci_high", "length-controlled", 0.04)):
        shown = [t for t in its if points[t].get(key) is not None]  # older metrics lack the LC win rate
        wr = [points[t][key] for t in shown]
        err = [[w - points[t][low] for w, t in zip(wr, shown)], [points[t][high] - w for w, t in zip(wr, shown)]]
        axes[0].errorbar([t + 1 + dx for t in shown], wr, yerr=err, marker="o", capsize=4, label=label)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].legend(fontsize=8)
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


def same_model(a: DictConfig, b: DictConfig) -> bool:
    """Whether two model options name the same scorer (what it is, not how it is batched)."""
    keys = ("path", "kind", "tiny", "seed", "fit", "judge_prompt", "judge_choices")
    plain_a, plain_b = (OmegaConf.to_container(spec, resolve=True) for spec in (a, b))

    def served(plain: dict) -> tuple:  # a served model is named by its server and served name
        return tuple((plain.get("served") or {}).get(k) for k in ("base_url", "api", "model"))

    return all(plain_a[k] == plain_b[k] for k in keys) and served(plain_a) == served(plain_b)


def with_verdict(scores: list[list[float]], *columns: list) -> tuple[list, ...]:
    """The rows the judge gave a verdict on (a served judge's garbage answer gives NaN: no verdict)."""
    keep = [n for n, s in enumerate(scores) if all(map(math.isfinite, s))]
    return tuple([column[n] for n in keep] for column in (scores, *columns))


def run(ctx: StageContext) -> StageResult:
    cfg, out_dir, tracker = ctx.cfg, ctx.directory, ctx.tracker
    t, e = ctx.iteration, cfg.evaluate
    held_out, _ = prompt_split(cfg)
    base_dir = base_model_dir(cfg, cfg.policy)
    shared = experiment_dir(cfg) / "_eval_answers"
    key = answers_key(cfg, held_out)
    # matched arms: pi_{t+1} and the control's pi_0 both answer with seed+1 against pi_0's seed answers,
    # so the control differs from the main comparison in the model only
    base_runs = [(e.seed, shared / f"base-{key}.jsonl")] + ([(e.seed + 1, shared / f"control-{key}.jsonl")]
                                                            if e.control else [])
    (base, *rest), reused = base_answers(cfg, base_dir, held_out, base_runs)
    control = rest[0] if rest else None
    (policy,) = answers(cfg, ctx.inputs["policy"], held_out, [(e.seed + 1, out_dir / "_work" / "policy_answers.jsonl")])

    prompts = [p["messages"] for p in held_out]
    spec = judge_spec(cfg)
    judge = open_scorer(cfg, spec, teacher_model_dir(cfg, spec))
    try:
        main_scores, _ = judge_pairs(prompts, policy, base, judge, f"judging pi_{t + 1} vs pi_0")
        ctrl_scores, ctrl_picks = (judge_pairs(prompts, control, base, judge, "judging the control") if control
                                   else (None, {}))
    finally:
        judge.close()
    served = cost_report(judge.stats, spec.served) if is_served(spec) else None
    judged = with_verdict(main_scores, policy, base)
    if not judged[0]:
        raise TsalignError(f"the judge {spec.name} gave no verdict on any of {len(main_scores)} pairs (garbage answers:"
                           f" {getattr(judge, 'garbage_examples', [])[:2]}); check its judge_prompt and judge_choices")
    main = comparison(*judged, e.tie_threshold, e.confidence, e.seed)
    ctrl_judged = with_verdict(ctrl_scores, control, base) if control else None
    ctrl = comparison(*ctrl_judged, e.tie_threshold, e.confidence, e.seed) if control and ctrl_judged[0] else None

    student_scores, agree = [None] * len(prompts), []
    if "student" in ctx.inputs:
        student = open_scorer(cfg, cfg.student, ctx.inputs["student"])
        student_scores = student.score_groups(prompts, [[a, b] for a, b in zip(policy, base)])
        student.close()
        agree = [student_agrees(s, Verdict(0, 1, 0.0) if m[0] > m[1] else Verdict(1, 0, 0.0))
                 for s, m in zip(student_scores, main_scores) if m[0] != m[1] and all(map(math.isfinite, m))]

    metrics = {k: v for k, v in main.items() if k != "outcomes"}
    judge_is_teacher = same_model(spec, cfg.teacher)
    metrics.update(policy=f"pi_{t + 1}", policy_from=policy_stage(cfg), judge=spec.name, judge_is_teacher=judge_is_teacher,
                   student_agreement=statistics.fmean(agree) if agree else None, agreement_pairs=len(agree),
                   mean_length={"policy": statistics.fmean(map(len, policy)), "base": statistics.fmean(map(len, base))},
                   empty_answers={"policy": sum(not a.strip() for a in policy), "base": sum(not a.strip() for a in base)},
                   no_verdict={"main": len(main_scores) - len(judged[0]),
                               "control": len(ctrl_scores) - len(ctrl_judged[0]) if control else 0})
    if served:
        metrics["served"] = served
        say(f"[evaluate] {cost_line(served)}")
    if ctrl:
        checks = control_checks(ctrl["outcomes"], [len(a) for a in ctrl_judged[1]], [len(b) for b in ctrl_judged[2]],
                                ctrl_picks.get("first_position_picks"), ctrl_picks.get("verdicts"), e.confidence)
        metrics["control"] = {**{k: v for k, v in ctrl.items() if k != "outcomes"}, **checks}
    else:
        metrics["control"] = None
    rows = [{"prompt_id": p["prompt_id"], "policy": a, "base": b, "judge": m if all(map(math.isfinite, m)) else None,
             "student": s}
            for p, a, b, m, s in zip(held_out, policy, base, main_scores, student_scores)]
    outputs = {"metrics": atomic_write_json(out_dir / "metrics.json", metrics),
               "judgements": atomic_write_jsonl(out_dir / "judgements.jsonl", rows)}
    outputs["plot"] = progress_plot(experiment_dir(cfg), metrics, t, out_dir / "progress.png")
    tracker.log({f"evaluate/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.table("evaluate/answers_sample", [
        {"prompt": p["messages"][-1]["content"], f"pi_{t + 1}": a, "pi_0": b, "judge_policy": m[0], "judge_base": m[1]}
        for p, a, b, m in list(zip(held_out, policy, base, main_scores))[:20]])
    say(summary_line(metrics, t))
    counts = {k: metrics[k] for k in ("n", "win", "tie", "loss", "win_rate", "ci_low", "ci_high", "lc_win_rate",
                                      "lc_ci_low", "lc_ci_high", "student_agreement", "reward_delta", "policy_reward",
                                      "base_reward", "judge_is_teacher")}
    counts["reward_delta_ci"] = metrics["reward_delta_ci"]
    counts["control_win_rate"] = ctrl["win_rate"] if ctrl else None
    counts["control_passed"] = metrics["control"]["passed"] if ctrl else None
    counts["base_answers_from_cache"] = reused
    return StageResult(counts, outputs, {"plot": str(ctx.directory.parent / "evaluate" / "progress.png")})


# what a failed control check says (stats.control_checks)
_CONTROL_FAILURE = {"win_rate": "the two pi_0 arms were not judged alike", "position": "the judge prefers the first slot",
                    "length": "the judge prefers the longer answer"}


def summary_line(m: dict, t: int) -> str:
    def ci(lo: float, hi: float) -> str:
        return f"[{lo:.2f}, {hi:.2f}]"

    text = (f"[evaluate] pi_{t + 1} vs pi_0 on {m['n']} held-out prompts, judged by {m['judge']}: win {m['win']} / tie "
            f"{m['tie']} / loss {m['loss']}, win rate {m['win_rate']:.2f} {ci(m['ci_low'], m['ci_high'])}, "
            f"length-controlled {m['lc_win_rate']:.2f} {ci(m['lc_ci_low'], m['lc_ci_high'])}, reward difference "
            f"{m['reward_delta']:+.4f} {ci(*m['reward_delta_ci'])}")
    c = m["control"]
    if c:
        failed = "; ".join(f"{_CONTROL_FAILURE[name]} (p={check['p_value']:.3f})"
                           for name, check in c["checks"].items() if not check["passed"])
        text += (f"; control (pi_0 vs pi_0) {c['win_rate']:.2f} {ci(c['ci_low'], c['ci_high'])} "
                 + ("passed" if c["passed"] else f"FAILED: {failed}; an unbiased judge fails it in one run in "
                    f"{round(1 / (1 - c['confidence']))} by chance (more prompts tell: data.eval_prompts)"))
    if m["student_agreement"] is not None:
        text += f"; student agreement {m['student_agreement']:.2f}"
    if m["judge_is_teacher"]:
        text += ("\n[evaluate] the judge is the training teacher: this measures fit to the optimised reward, not "
                 "quality; claim quality with an independent judge (evaluate.judge=<conf/teacher option>)")
    return text


def check(cfg: DictConfig) -> None:
    check_sampler(cfg)  # pi_0 and pi_{t+1} answer with the sampler
    base_model(cfg, "policy")  # pi_0 answers beside pi_{t+1}
    if policy_stage(cfg) == "dpo":
        student = finished_output(cfg, cfg.iteration, "distill", "student", "evaluate")
        check_lengths(trained_model(student), {"student.max_length": cfg.student.max_length})
    check_judge(cfg)
    prompt_split(cfg)


STAGE = Stage("evaluate", plan, run, check)
