"""The shortlist audit: its arithmetic on hand-made scores (margin share, random share, containment, Spearman,
intervals, the no-better-than-random line), and rank's live audit on tiny models with every selection and the
reward-model, judge and served teachers."""

from __future__ import annotations

import json
import math

import pytest

from tsalign.algorithms.audit import audit_prompt, nested_pairs, spearman, summarize, verdict_line
from tsalign.algorithms.stats import average_ranks
from tsalign.stages.audit import audited

# ---------------------------------------------------------------- arithmetic


def test_average_ranks_share_ties():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_spearman_on_known_orders():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # textbook example: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, -1, 1, 0, 0): 1 - 12 / 120 = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1.0], [2.0]) is None


def test_margin_share_of_the_pair_sent_and_of_a_random_pair():
    teacher = {0: 0.0, 1: 1.0, 2: 3.0, 3: 4.0}  # widest margin 4 (3 vs 0)
    student = [0.2, 0.9, 0.1, 0.5]  # student's best 1, worst 2: a shortlist that misses both teacher extremes
    a = audit_prompt([0, 1, 2, 3], teacher, student, [1, 2])
    assert a.sent_share == pytest.approx((3.0 - 1.0) / 4)  # the teacher orders what it is sent: 2 over 1
    # the six pairs' gaps: 1, 3, 4, 2, 3, 1 -> mean 14/6, as a share of 4
    assert a.random_share == pytest.approx(14 / 6 / 4)
    assert (a.has_best, a.has_worst) == (False, False)
    assert a.spearman == pytest.approx(spearman([0.2, 0.9, 0.1, 0.5], [0.0, 1.0, 3.0, 4.0]))
    # ordered by the student (student_only): its best 1 over its worst 2, against the teacher: negative
    assert audit_prompt([0, 1, 2, 3], teacher, student, [1, 2], decided_by_student=True).sent_share == \
        pytest.approx((1.0 - 3.0) / 4)
    perfect = audit_prompt([0, 1, 2, 3], teacher, [0.0, 0.1, 0.2, 0.3], [3, 0])
    assert (perfect.sent_share, perfect.has_best, perfect.has_worst, perfect.spearman) == (1.0, True, True, 1.0)


def test_a_prompt_the_teacher_scores_alike_has_no_share_but_counts_for_containment():
    a = audit_prompt([0, 1, 2], {0: 0.5, 1: 0.5, 2: 0.5}, [0.1, 0.2, 0.3], [2, 0])
    assert a.sent_share is None and a.random_share is None and a.has_best and a.has_worst and a.spearman is None


def test_only_distinct_candidates_count():
    """A duplicate candidate (index 2 repeats 0) is not in `candidates`: random pairs are over 0, 1, 3 only."""
    a = audit_prompt([0, 1, 3], {0: 0.0, 1: 2.0, 3: 1.0}, [0.0, 1.0, 0.0, 0.5], [1, 0])
    assert a.random_share == pytest.approx((2 + 1 + 1) / 3 / 2)


def test_summary_with_intervals_and_the_no_better_than_random_line():
    from tsalign.algorithms.audit import PromptAudit

    worse = [PromptAudit(0.2 + 0.01 * i, 0.5, i % 2 == 0, True, 0.1) for i in range(20)]
    s = summarize(worse, seed=3)
    assert s["audit_prompts"] == 20 and s["audit_sent_share"] == pytest.approx(0.295)
    assert s["audit_random_share"] == pytest.approx(0.5) and s["audit_share_gain"] == pytest.approx(-0.205)
    assert s["audit_sent_share_ci_low"] < 0.295 < s["audit_sent_share_ci_high"]
    assert s["audit_share_gain_ci_high"] < 0  # every prompt below random: the interval is too
    assert s["audit_has_best"] == 0.5 and s["audit_has_worst"] == 1.0 and s["audit_has_both"] == 0.5
    assert 0 < s["audit_has_worst_ci_low"] < 1.0 == pytest.approx(s["audit_has_worst_ci_high"])  # Wilson: a width at 1
    line = verdict_line(s)
    assert line.startswith("the student's shortlist kept 0.30 of the teacher's widest margin, random pairs 0.50 "
                           "(difference -0.20 [") and "no better than random" in line
    better = summarize([PromptAudit(0.9, 0.4, True, True, 0.8) for _ in range(10)])
    assert better["audit_share_gain_ci_low"] > 0 and verdict_line(better) is None
    assert summarize([])["audit_sent_share"] is None and verdict_line(summarize([])) is None


def test_the_audited_prompts_are_a_seeded_share_of_those_with_a_shortlist():
    shortlists = [[0, 1], [], [2, 0], [1, 3], [0, 2], [3, 1], [], [1, 2], [0, 3], [2, 3], [1, 0], [3, 2]]
    picked = audited(shortlists, 0.5, seed=7)
    assert len(picked) == 5 and picked == sorted(picked) and all(shortlists[i] for i in picked)
    assert picked == audited(shortlists, 0.5, seed=7) and picked != audited(shortlists, 0.5, seed=8)
    assert audited(shortlists, 0.01, seed=0) != [] and audited(shortlists, 0.0, seed=0) == []
    assert audited(shortlists, 1.0, seed=0) == [i for i, s in enumerate(shortlists) if s]


# ---------------------------------------------------------------- rank's live audit on tiny models

AUDIT = ["generate.num_candidates=4", "data.prompts_per_iteration=8", "sampler.max_new_tokens=8",
         "rank.audit_fraction=1.0"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from conftest import run_stage_inprocess

    out = tmp_path_factory.mktemp("audit")
    cfg, _ = run_stage_inprocess("generate", out, AUDIT)
    return out


def rank_with(tmp_path, generated, overrides: list[str]) -> tuple[dict, list[dict]]:
    import shutil

    from conftest import run_stage_inprocess

    out = tmp_path / "outputs"
    shutil.copytree(generated, out)
    cfg, manifest = run_stage_inprocess("rank", out, [*AUDIT, *overrides])
    rank = out / "default" / "iter_0" / "rank"
    return json.loads((rank / "metrics.json").read_text()), [json.loads(line) for line in
                                                             (rank / "scores.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("selection", ["best_worst", "top_bottom", "all", "random_pair", "uncertain", "student_only"])
def test_rank_audits_every_selection_with_a_reward_model_teacher(tmp_path, generated, selection):
    extra = ["rank.shortlist_m=2"] if selection == "top_bottom" else []
    metrics, rows = rank_with(tmp_path, generated, [f"rank.selection={selection}", *extra])
    audited_rows = [r for r in rows if "audit_teacher_scores" in r]
    assert metrics["audit_prompts"] == len(audited_rows) == sum(bool(r["shortlist"]) for r in rows) > 0
    assert metrics["audit_teacher_calls"] == sum(sum(s is not None for s in r["audit_teacher_scores"])
                                                 for r in audited_rows)  # a reward model: one call per response
    for r in audited_rows:  # the audit's own figures, recomputed from what rank wrote
        t = {k: s for k, s in enumerate(r["audit_teacher_scores"]) if s is not None}
        assert r["audit_teacher_scores"][r["shortlist"][0]] is not None
        if r.get("teacher_scores") and selection != "student_only":  # the same RM scored the shortlist: same scores
            assert [t[k] for k in r["shortlist"]] == pytest.approx(r["teacher_scores"], abs=1e-5)
    if selection == "all":
        assert metrics["audit_has_both"] == 1.0  # the teacher saw everything
        assert metrics["audit_sent_share"] in (None, pytest.approx(1.0))
    for key in ("audit_sent_share", "audit_random_share", "audit_spearman", "audit_has_best"):
        assert key in metrics and f"{key}_ci_low" in metrics


def test_rank_audit_with_a_judge_teacher_counts_its_calls_apart(tmp_path, generated):
    metrics, rows = rank_with(tmp_path, generated, ["teacher=tiny_judge"])
    n = metrics["audit_prompts"]
    distinct = [sum(s is not None for s in r["audit_teacher_scores"]) for r in rows if "audit_teacher_scores" in r]
    assert n == len(distinct) > 0
    assert metrics["audit_teacher_calls"] == sum(d * (d - 1) for d in distinct)  # every pair, both orders
    assert metrics["teacher_calls"] == 2 * metrics["teacher_prompts"]  # the shortlist's own calls, unchanged


def test_audit_off_asks_nothing_more(tmp_path, generated):
    metrics, rows = rank_with(tmp_path, generated, ["rank.audit_fraction=0"])
    assert "audit_prompts" not in metrics and not any("audit_teacher_scores" in r for r in rows)


def test_rank_audit_with_a_served_teacher(tmp_path, generated, stub, clean_ledger):
    import uuid

    metrics, rows = rank_with(tmp_path, generated, [
        "teacher=served_judge", f"teacher.served.base_url={stub.url}", f"teacher.served.model=stub-{uuid.uuid4().hex[:8]}",
        "teacher.served.backoff_s=0.01", "teacher.max_length=256"])
    assert metrics["audit_prompts"] > 0 and math.isfinite(metrics["audit_spearman"] or 0.0)
    assert metrics["audit_served"]["calls"] == metrics["audit_teacher_calls"] > 0
    assert metrics["served"]["calls"] == metrics["teacher_calls"]  # the shortlist's cost apart from the audit's


def test_nested_pairs_carry_the_teachers_order():
    scores = [0.1, 0.5, None, 0.3, 0.9, 0.2]  # order 4 > 1 > 3 > 5 > 0; index 2 not scored (a duplicate)
    assert nested_pairs(scores) == [(4, 0, pytest.approx(0.8)), (1, 5, pytest.approx(0.3))]
    cut = [True, True, True, True, False, True]  # the teacher's best is cut: never chosen
    assert nested_pairs(scores, cut) == [(1, 0, pytest.approx(0.4)), (3, 5, pytest.approx(0.1))]
    assert nested_pairs([0.5, 0.5]) == [] and nested_pairs([0.5, None]) == []


def test_distill_trains_on_the_audits_pairs_but_not_on_held_out_prompts(tmp_path, generated):
    from conftest import run_stage_inprocess

    metrics, rows = rank_with(tmp_path, generated, [])
    out = tmp_path / "outputs"
    cfg, manifest = run_stage_inprocess("distill", out, [*AUDIT, "distill.audit_pairs=true", "distill.holdout_fraction=0.5",
                                                       "distill.human_labels=null"])
    distill = json.loads((out / "default" / "iter_0" / "distill" / "metrics.json").read_text())
    from tsalign.data import split_pairs

    pairs = [json.loads(line) for line in (out / "default" / "iter_0" / "rank" / "pairs.jsonl").read_text().splitlines()]
    held_out = {p["prompt_id"] for p in split_pairs(pairs, 0.5, manifest["config"]["seed"])[1]}  # distill's own split
    assert cfg.rank.cut_answers == "keep"  # model=tiny: its 8-token answers are all cut
    expected = sum(len(nested_pairs(r["audit_teacher_scores"])) for r in rows
                   if "audit_teacher_scores" in r and r["prompt_id"] not in held_out)
    assert held_out and distill["audit_pairs"] == expected > 0 and manifest["counts"]["audit_pairs"] == expected
    assert distill["train_pairs"] == metrics["pairs"] - distill["held_out_pairs"] + distill["audit_pairs"]
    assert "audit_scores" in manifest["inputs"] and "audit_candidates" in manifest["inputs"]


def test_the_audit_resumes_after_a_crash(tmp_path, generated, monkeypatch):
    """A crash inside the audit's teacher call keeps its finished chunks (_work/audit.partial.jsonl): the rerun asks the
    teacher for the lost chunk only, and its figures equal an uninterrupted run's."""
    import tsalign.engines.scoring.resumable
    import tsalign.stages.rank as rank

    clean, _ = rank_with(tmp_path / "clean", generated, [])
    monkeypatch.setattr(tsalign.engines.scoring.resumable, "SCORE_CHUNK", 4)
    real_open, seen = rank.open_scorer, []

    def spying_open(cfg, spec, model_dir, crash: bool):
        scorer = real_open(cfg, spec, model_dir)
        score = scorer.score_groups

        def score_groups(prompts, groups):
            audit = len(groups[0]) > 2  # the shortlist sends 2 candidates, the audit all K
            seen.append(("audit" if audit else "shortlist", len(groups)))
            if crash and audit and [s[0] for s in seen].count("audit") == 2:
                raise RuntimeError("simulated crash inside the audit")
            return score(prompts, groups)

        scorer.score_groups = score_groups
        return scorer

    monkeypatch.setattr(rank, "open_scorer", lambda cfg, spec, d: spying_open(cfg, spec, d, True)
                        if spec.name == cfg.teacher.name else real_open(cfg, spec, d))
    try:
        rank_with(tmp_path, generated, [])
    except RuntimeError as e:
        assert "simulated crash" in str(e)
    else:
        raise AssertionError(seen)
    assert seen == [("shortlist", 4), ("shortlist", 4), ("audit", 4), ("audit", 4)], seen
    seen.clear()
    monkeypatch.setattr(rank, "open_scorer", lambda cfg, spec, d: spying_open(cfg, spec, d, False)
                        if spec.name == cfg.teacher.name else real_open(cfg, spec, d))
    from conftest import run_stage_inprocess

    run_stage_inprocess("rank", tmp_path / "outputs", AUDIT)
    assert seen == [("audit", 4)]  # the student's and the shortlist's chunks and the first audit chunk were kept
    resumed = json.loads((tmp_path / "outputs" / "default" / "iter_0" / "rank" / "metrics.json").read_text())
    for key in ("audit_sent_share", "audit_random_share", "audit_spearman", "audit_has_both", "audit_teacher_calls"):
        assert resumed[key] == pytest.approx(clean[key], abs=1e-3), key  # chunks of 4 vs 64: padding moves floats


def test_with_cut_answers_never_chosen_the_audit_counts_only_what_can_become_a_pair():
    teacher = {0: 4.0, 1: 1.0, 2: 3.0, 3: 0.0}  # the teacher's favourite (0) was cut at max_new_tokens
    complete = [False, True, True, True]
    a = audit_prompt([0, 1, 2, 3], teacher, [0.0, 0.9, 0.5, 0.1], [1, 3], complete=complete)
    # widest usable margin: best complete (2: 3.0) over the worst (3: 0.0) = 3; the shortlist's pair 1 > 3 keeps 1
    assert a.sent_share == pytest.approx(1 / 3) and (a.has_best, a.has_worst) == (False, True)
    # pairs: (0,1) cut preferred -> 0, (0,2) 0, (0,3) 0, (1,2) 2, (1,3) 1, (2,3) 3 -> mean 1 of 3
    assert a.random_share == pytest.approx((2 + 1 + 3) / 6 / 3)
    assert audit_prompt([0, 1, 2, 3], teacher, [0.0, 0.9, 0.5, 0.1], [0, 3], complete=complete).sent_share == 0.0
    no_choice = audit_prompt([0, 1], {0: 1.0, 1: 0.0}, [0.0, 1.0], [0, 1], complete=[False, False])
    assert no_choice.sent_share is None and not no_choice.has_best


def test_the_loop_summary_and_the_report_show_the_audit(tmp_path, capsys):
    from tsalign.algorithms.audit import PromptAudit
    from tsalign.pipeline.loop import print_summary
    from tsalign.views.report import write_report
    from tsalign.views.status import experiment_status, format_status

    exp = tmp_path / "exp"
    figures = [summarize([PromptAudit(0.3, 0.5, False, True, 0.1)] * 8), summarize([PromptAudit(0.9, 0.4, True, True,
                                                                                               0.6)] * 8)]
    for t, audit in enumerate(figures):
        rank = exp / f"iter_{t}" / "rank"
        rank.mkdir(parents=True)
        (rank / "metrics.json").write_text(json.dumps({"pairs": 5, **audit}))
        (rank / "manifest.json").write_text(json.dumps({"stage": "rank", "iteration": t, "counts": {
            "pairs": 5, "audit_sent_share": audit["audit_sent_share"], "audit_random_share": audit["audit_random_share"]}}))
    print_summary(exp, range(2))
    out = capsys.readouterr().out
    assert "share_sent [95%]" in out and "spearman [95%]" in out and "0.300 [0.30, 0.30]" in out
    lines = [line for line in out.splitlines() if "no better than random" in line]
    assert len(lines) == 1 and lines[0].startswith("iter_0: the student's shortlist kept 0.30")  # iter_1 beats random
    page = write_report(exp).read_text()
    assert "share_sent [95%]" in page and "iter_0: the student&#x27;s shortlist kept 0.30" in page
    assert "audit_sent_share 0.3" in format_status(exp, experiment_status(exp, None))
