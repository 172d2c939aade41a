"""rank and distill end to end on the tiny models: generate -> rank -> distill at iteration 0, the baselines
on the same candidates, skip / ConfigChanged, bad inputs, human-pair distillation and the fitted teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

import tsalign.cli
from tsalign.algorithms.selection import Verdict, student_agrees
from tsalign.artifacts.store import ConfigChanged, read_jsonl, read_manifest, stage_dir
from tsalign.config.schema import FitSpec
from tsalign.errors import TsalignError
from tsalign.pipeline.runner import run_stage
from tsalign.stages.factory import student_base_dir, teacher_model_dir
from tsalign.stages.lineage import base_model_dir

K, PROMPTS = 3, 4  # conf/model/tiny.yaml: generate.num_candidates, data.prompts_per_iteration

HUMAN = [
    ("What is the capital of France?", "The capital of France is Paris.", "France is a country."),
    ("Name a primary colour.", "Red is a primary colour.", "I like turtles."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders are scary."),
    ("What is 2 + 2?", "2 + 2 equals 4.", "It is a number."),
    ("Give one word for happy.", "Joyful.", "Sad."),
    ("Which planet is closest to the sun?", "Mercury is the closest planet to the sun.", "Mars, probably."),
    ("What do bees make?", "Bees make honey and wax.", "Noise."),
    ("What is H2O?", "H2O is water: two hydrogen atoms and one oxygen atom.", "A band."),
    ("Translate 'gato' to English.", "'Gato' means 'cat'.", "Dog."),
    ("How many days are in a week?", "A week has seven days.", "Many."),
]


def configure(outputs: Path, *overrides: str):
    with hydra.initialize_config_dir(config_dir=tsalign.cli.CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", ["model=tiny", f"paths.outputs={outputs}", "device=cpu", *overrides])
    OmegaConf.set_readonly(cfg, False)
    return tsalign.cli.configure(cfg)


def run(outputs: Path, stage: str, *overrides: str):
    cfg = configure(outputs, f"stage={stage}", *overrides)
    return cfg, run_stage(cfg, stage)


def write_human_pairs(path: Path, rows=HUMAN) -> Path:
    path.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}) + "\n" for q, c, r in rows))
    return path


@pytest.fixture(scope="module")
def ts(tmp_path_factory):
    """One TS-Align iteration 0 (generate, rank best_worst, distill) in experiment 'ts'."""
    outputs = tmp_path_factory.mktemp("rank_distill")
    _, gen = run(outputs, "generate", "experiment_name=ts")
    rank_cfg, rank = run(outputs, "rank", "experiment_name=ts")
    distill_cfg, distill = run(outputs, "distill", "experiment_name=ts")
    exp = Path(rank_cfg.experiment_dir)
    return {"outputs": outputs, "exp": exp, "gen": gen, "rank": rank, "distill": distill, "rank_cfg": rank_cfg,
            "distill_cfg": distill_cfg, "candidates": read_jsonl(stage_dir(exp, 0, "generate") / "candidates.jsonl")}


def rank_outputs(exp: Path) -> tuple[list[dict], list[dict], dict]:
    d = stage_dir(exp, 0, "rank")
    return read_jsonl(d / "scores.jsonl"), read_jsonl(d / "pairs.jsonl"), json.loads((d / "metrics.json").read_text())


def distinct(texts: list[str]) -> int:
    return len({t.strip() for t in texts if t.strip()})


# ---------------------------------------------------------------- rank: the TS-Align default


def test_best_worst_scores_pairs_and_metrics(ts):
    scores, pairs, metrics = rank_outputs(ts["exp"])
    cands = ts["candidates"]
    assert len(cands) == PROMPTS and all(len(r["candidates"]) == K for r in cands)
    assert [s["prompt_id"] for s in scores] == [c["prompt_id"] for c in cands]
    by_id = {c["prompt_id"]: c for c in cands}
    for row in scores:
        texts = [c["text"] for c in by_id[row["prompt_id"]]["candidates"]]
        assert len(row["student_scores"]) == K  # the student scores every candidate
        expected = 2 if distinct(texts) >= 2 else 0
        assert len(row["shortlist"]) == expected == len(row["teacher_scores"])  # the teacher only its shortlist
        if expected:
            s = row["student_scores"]
            assert s[row["shortlist"][0]] == max(s) and s[row["shortlist"][1]] == min(s)
    assert metrics["teacher_calls"] == sum(len(s["shortlist"]) for s in scores)
    assert metrics["student_calls"] == K * PROMPTS
    assert metrics["prompts"] == PROMPTS and metrics["candidates"] == K * PROMPTS
    assert metrics["pairs"] == len(pairs) >= 1
    assert metrics["pairs"] + metrics["no_pair"]["tie"] + metrics["no_pair"]["too_few_distinct"] == PROMPTS

    agreement = []
    for pair in pairs:
        row = next(s for s in scores if s["prompt_id"] == pair["prompt_id"])
        cand = by_id[pair["prompt_id"]]
        assert pair["prompt"] == cand["prompt"] and isinstance(pair["prompt"], list)
        assert all({"role", "content"} <= set(m) for m in pair["prompt"])
        for key in ("chosen", "rejected"):
            assert pair[key] == [{"role": "assistant", "content": cand["candidates"][pair[f"{key}_index"]]["text"]}]
        assert (row["chosen"], row["rejected"]) == (pair["chosen_index"], pair["rejected_index"])
        t = dict(zip(row["shortlist"], row["teacher_scores"]))
        assert t[pair["chosen_index"]] == max(t.values()) and t[pair["rejected_index"]] == min(t.values())
        assert pair["margin"] > 0 and pair["margin"] == pytest.approx(max(t.values()) - min(t.values()))
        assert pair["selection"] == "best_worst" and pair["iteration"] == 0
        agreement.append(student_agrees(row["student_scores"],
                                        Verdict(pair["chosen_index"], pair["rejected_index"], pair["margin"])))
    assert 0.0 <= metrics["student_teacher_agreement"] <= 1.0
    assert metrics["student_teacher_agreement"] == pytest.approx(sum(agreement) / len(agreement))
    assert metrics["agreement_pairs"] == len(pairs)
    counts = ts["rank"]["counts"]
    assert counts["teacher_calls"] == metrics["teacher_calls"] and counts["pairs"] == len(pairs)
    assert set(ts["rank"]["inputs"]) == {"candidates"}  # iteration 0: the base student is config, not an input


def test_rank_scores_are_the_models_scores_of_the_right_texts(ts):
    """Re-score independently: the student saw every candidate, the teacher exactly its shortlist."""
    from tsalign.engines.scoring.reward_model import RewardModelScorer

    cfg = ts["rank_cfg"]
    scores, _, _ = rank_outputs(ts["exp"])
    by_id = {c["prompt_id"]: c for c in ts["candidates"]}
    prompts = [by_id[s["prompt_id"]]["prompt"] for s in scores]
    texts = [[c["text"] for c in by_id[s["prompt_id"]]["candidates"]] for s in scores]
    student = RewardModelScorer(base_model_dir(cfg, cfg.student), max_length=cfg.student.max_length, seed=cfg.student.seed)
    teacher = RewardModelScorer(teacher_model_dir(cfg), max_length=cfg.teacher.max_length, seed=cfg.teacher.seed)
    try:
        s_again = student.score_groups(prompts, texts)
        t_again = teacher.score_groups(prompts, [[t[k] for k in s["shortlist"]] for t, s in zip(texts, scores)])
    finally:
        student.close()
        teacher.close()
    for row, s, t in zip(scores, s_again, t_again):
        # the tiny random models' scores differ between candidates by ~1e-5 on ~1e-3: compare tightly
        assert row["student_scores"] == pytest.approx(s, rel=1e-4, abs=1e-9)
        assert row["teacher_scores"] == pytest.approx(t, rel=1e-4, abs=1e-9)
    # student and teacher are different models (seeds 0 and 7): their scores must differ
    assert any(r["student_scores"][r["shortlist"][0]] != pytest.approx(r["teacher_scores"][0], abs=1e-3)
               for r in scores if r["shortlist"])


def test_rank_rerun_is_skipped(ts, capsys):
    path = stage_dir(ts["exp"], 0, "rank") / "pairs.jsonl"
    before = path.stat().st_mtime_ns
    _, manifest = run(ts["outputs"], "rank", "experiment_name=ts")
    assert manifest == read_manifest(path.parent) == ts["rank"]
    assert path.stat().st_mtime_ns == before
    assert "skipped" in capsys.readouterr().out


def test_changing_selection_in_the_same_experiment_is_config_changed(ts):
    with pytest.raises(ConfigChanged, match="rank.selection"):
        run(ts["outputs"], "rank", "experiment_name=ts", "rank.selection=all")
    assert read_manifest(stage_dir(ts["exp"], 0, "rank")) == ts["rank"]  # the old result is untouched


# ---------------------------------------------------------------- baselines on the same candidates


def test_teacher_ranks_all_on_the_same_candidates(ts):
    _, manifest = run(ts["outputs"], "rank", "experiment_name=all", "rank.selection=all", "rank.candidates_from=ts")
    exp = ts["outputs"] / "all"
    assert not (exp / "iter_0" / "generate").exists()  # no candidates of its own
    assert manifest["inputs"]["candidates"]["path"] == str(stage_dir(ts["exp"], 0, "generate") / "candidates.jsonl")
    scores, pairs, metrics = rank_outputs(exp)
    base_scores, _, _ = rank_outputs(ts["exp"])
    n_valid = sum(distinct([c["text"] for c in r["candidates"]]) for r in ts["candidates"])
    assert n_valid == K * PROMPTS  # random tiny-policy samples are distinct; all K go to the teacher
    assert metrics["teacher_calls"] == K * PROMPTS
    assert metrics["teacher_fraction_seen"] == pytest.approx(1.0)
    for row, base in zip(scores, base_scores):
        assert row["prompt_id"] == base["prompt_id"]
        assert row["student_scores"] == pytest.approx(base["student_scores"], rel=1e-5, abs=1e-9)  # same candidates
        assert sorted(row["shortlist"]) == list(range(K))
        t = dict(zip(row["shortlist"], row["teacher_scores"]))
        for k, v in zip(base["shortlist"], base["teacher_scores"]):
            assert t[k] == pytest.approx(v, rel=1e-4, abs=1e-9)  # the teacher's verdict on a text does not depend on the rest
        if row["chosen"] is not None:
            assert t[row["chosen"]] == max(t.values()) and t[row["rejected"]] == min(t.values())
    assert all(p["selection"] == "all" for p in pairs) and len(pairs) == metrics["pairs"]


def test_student_only_uses_no_teacher(ts):
    _, manifest = run(ts["outputs"], "rank", "experiment_name=so", "rank.selection=student_only",
                      "rank.candidates_from=ts")
    scores, pairs, metrics = rank_outputs(ts["outputs"] / "so")
    assert metrics["teacher_calls"] == 0 and manifest["counts"]["teacher_calls"] == 0
    assert metrics["student_teacher_agreement"] is None
    assert all(s["teacher_scores"] == [] for s in scores)
    assert len(pairs) == PROMPTS  # distinct student scores: every prompt makes a pair
    for pair in pairs:
        row = next(s for s in scores if s["prompt_id"] == pair["prompt_id"])
        s = row["student_scores"]
        assert s[pair["chosen_index"]] == max(s) and s[pair["rejected_index"]] == min(s)
        assert pair["margin"] == pytest.approx(max(s) - min(s)) and pair["margin"] > 0
        assert pair["judge"] == ts["rank_cfg"].student.name


def test_random_pair_teacher_sees_two_per_prompt(ts):
    run(ts["outputs"], "rank", "experiment_name=rp", "rank.selection=random_pair", "rank.candidates_from=ts")
    scores, pairs, metrics = rank_outputs(ts["outputs"] / "rp")
    assert metrics["teacher_calls"] == 2 * PROMPTS
    assert all(len(set(s["shortlist"])) == 2 for s in scores)
    assert all(p["margin"] > 0 for p in pairs)


@pytest.fixture(scope="module")
def judge_rank(ts):
    """teacher=smollm2_judge (the shipped judge prompt) on the tiny Llama, ranking all K of ts's candidates."""
    cfg = configure(ts["outputs"], "stage=rank", "teacher=smollm2_judge", "experiment_name=judge",
                    "rank.selection=all", "rank.candidates_from=ts")
    policy = ts["rank_cfg"].policy
    assert cfg.teacher.path == policy.path  # the judge is SmolLM2: make it the tiny random one
    cfg.teacher.tiny = OmegaConf.to_container(policy.tiny)
    manifest = run_stage(cfg, "rank")
    return manifest, *rank_outputs(ts["outputs"] / "judge")


def test_judge_teacher_ranks_by_round_robin_in_both_orders(judge_rank):
    manifest, scores, pairs, metrics = judge_rank
    n_pairs = K * (K - 1) // 2
    assert metrics["teacher_calls"] == 2 * n_pairs * PROMPTS  # every pair, both orders
    assert manifest["counts"]["teacher_calls"] == metrics["teacher_calls"]
    assert 0.0 <= metrics["judge_first_position_rate"] <= 1.0
    for row in scores:
        assert len(row["teacher_scores"]) == K and all(0.0 <= v <= 1.0 for v in row["teacher_scores"])
        assert sum(row["teacher_scores"]) == pytest.approx(K * 0.5, abs=1e-5)  # p and 1 - p per pair
    for pair in pairs:
        row = next(s for s in scores if s["prompt_id"] == pair["prompt_id"])
        t = dict(zip(row["shortlist"], row["teacher_scores"]))
        assert t[pair["chosen_index"]] == max(t.values()) and pair["margin"] > 0
        assert pair["judge"] == "smollm2-judge"


def test_teacher_fraction_seen_counts_candidates_not_judge_comparisons(judge_rank):
    """The judge saw each of the K candidates (in K-1 comparisons each): the fraction seen is 1, not 2."""
    _, scores, _, metrics = judge_rank
    assert sum(len(s["shortlist"]) for s in scores) == metrics["candidates"] == K * PROMPTS
    assert metrics["teacher_fraction_seen"] == pytest.approx(1.0)


# ---------------------------------------------------------------- distill


def test_distill_writes_a_trained_one_output_student(ts):
    from transformers import AutoModelForSequenceClassification

    manifest, cfg = ts["distill"], ts["distill_cfg"]
    out = stage_dir(ts["exp"], 0, "distill") / "student"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.classifier.out_features == 1
    start = AutoModelForSequenceClassification.from_pretrained(base_model_dir(cfg, cfg.student)).state_dict()
    trained = model.state_dict()
    assert set(start) == set(trained)
    assert any(not torch.equal(start[k], trained[k]) for k in start)

    counts = manifest["counts"]
    n_pairs = ts["rank"]["counts"]["pairs"]
    assert counts["train_pairs"] + counts["held_out_pairs"] == n_pairs
    assert counts["held_out_pairs"] == round(n_pairs * cfg.distill.holdout_fraction)
    assert counts["steps"] == cfg.distill.epochs * -(-counts["train_pairs"] // cfg.distill.batch_size)
    for key in ("agreement_before", "agreement_after"):
        assert key in counts
        if counts["held_out_pairs"]:
            assert 0.0 <= counts[key] <= 1.0
    assert set(manifest["inputs"]) == {"pairs"}
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert metrics["label"] == "teacher" and metrics["replayed_pairs"] == 0
    assert metrics["train"]["loss_first"] is not None
    # the student on the 300 human-labelled responses (distill.human_labels), before and after, and length's AUC
    labels = metrics["human_labels"]
    assert counts["human_labels_rows"] == labels["rows"] == 300
    assert counts["human_labels_auc_after"] == round(labels["after"], 4) and 0.0 <= labels["after"] <= 1.0
    assert labels["change"] == pytest.approx(labels["after"] - labels["before"])
    assert labels["change_ci"][0] <= labels["change"] <= labels["change_ci"][1]
    assert abs(labels["longer_auc"] - 0.5) < 0.05  # the data's good and bad answers have the same lengths


def test_a_students_scores_on_a_fixed_set_are_kept_by_model_content(ts, tmp_path, monkeypatch):
    """distill scores its student before and after training on the fixed human sets; the scores of a model it scored
    before (the configured student, or the previous iteration's) are read back, not computed again."""
    import tsalign.training.reward_model as rm

    cfg = ts["distill_cfg"]
    student = base_model_dir(cfg, cfg.student)
    prompts, texts = [[{"role": "user", "content": q}] for q, _, _ in HUMAN], [c for _, c, _ in HUMAN]
    fresh = rm.known_scores(student, prompts, texts, 64, "cpu", 0)
    assert rm.known_scores(student, prompts, texts, 64, "cpu", 0, tmp_path) == fresh
    assert len(list((tmp_path / "reward_scores").glob("*.json"))) == 1
    loads = []
    real = rm.RewardModelScorer
    monkeypatch.setattr(rm, "RewardModelScorer", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert rm.known_scores(student, prompts, texts, 64, "cpu", 0, tmp_path) == fresh and not loads
    rm.known_scores(student, prompts, texts[::-1], 64, "cpu", 0, tmp_path)  # other texts: scored
    trained = stage_dir(ts["exp"], 0, "distill") / "student"
    rm.known_scores(trained, prompts, texts, 64, "cpu", 0, tmp_path)  # another model: scored
    assert len(loads) == 2


def test_cut_answers_are_never_chosen_and_counted(ts):
    """rank.cut_answers=rejected_only (the default outside tests): an answer cut at max_new_tokens may be
    rejected but never chosen; every prompt ends in a pair or a counted reason."""
    _, manifest = run(ts["outputs"], "rank", "experiment_name=cut", "rank.cut_answers=rejected_only",
                      "rank.candidates_from=ts")
    scores, pairs, metrics = rank_outputs(ts["outputs"] / "cut")
    cut = {(r["prompt_id"], k) for r in ts["candidates"] for k, c in enumerate(r["candidates"])
           if c["finish_reason"] == "length"}
    assert metrics["candidates_cut"] == len(cut) > 0
    assert metrics["pairs_chosen_cut"] == 0 and not any((p["prompt_id"], p["chosen_index"]) in cut for p in pairs)
    assert metrics["pairs_rejected_cut"] == sum((p["prompt_id"], p["rejected_index"]) in cut for p in pairs)
    assert metrics["pairs"] + sum(metrics["no_pair"].values()) == PROMPTS
    all_cut = sum(all((r["prompt_id"], k) in cut for k in range(K)) for r in ts["candidates"])
    assert metrics["no_pair"]["no_complete_answer"] == all_cut
    _, kept_pairs, kept = rank_outputs(ts["exp"])  # the tiny preset keeps them (random models hardly ever stop)
    assert kept["cut_answers"] == "keep"
    assert kept["pairs_chosen_cut"] == sum((p["prompt_id"], p["chosen_index"]) in cut for p in kept_pairs) > 0


def test_distill_fingerprints_the_teacher_fit_it_reads(ts, tmp_path):
    """distill reports the student on the human pairs the teacher's fit held out: a change to the
    teacher's fit must make a finished distill stale, not leave it 'done' with stale metrics."""
    from tsalign.pipeline.runner import stage_record

    human = write_human_pairs(tmp_path / "human.jsonl")
    cfg = configure(ts["outputs"], "stage=distill", "experiment_name=ts", f"teacher.fit.data={human}")
    _, plan, record = stage_record(cfg, "distill")
    assert plan.config["teacher"]["fit"]["data"] == str(human)
    with pytest.raises(ConfigChanged, match=r"changed: teacher\)"):
        record.is_done()
    more_epochs = configure(ts["outputs"], "stage=distill", "experiment_name=ts", f"teacher.fit.data={human}",
                            "teacher.fit.epochs=5")
    assert stage_record(more_epochs, "distill")[1].config["teacher"]["fit"]["epochs"] == 5
    # without a fit there is no human hold-out to report, and the teacher is not an input of distill
    assert "teacher" not in stage_record(ts["distill_cfg"], "distill")[1].config


# ---------------------------------------------------------------- errors a user can make


def copy_generate(ts, name: str) -> Path:
    """Another experiment holding a finished copy of ts's generate stage."""
    dst = stage_dir(ts["outputs"] / name, 0, "generate")
    shutil.copytree(stage_dir(ts["exp"], 0, "generate"), dst)
    return dst / "candidates.jsonl"


def test_rank_before_generate_says_what_to_run(tmp_path):
    with pytest.raises(TsalignError, match="stage=generate iteration=0"):
        run(tmp_path, "rank", "experiment_name=nothing")
    with pytest.raises(TsalignError, match="not a finished generate output"):
        run(tmp_path, "rank", "experiment_name=x", "rank.candidates_from=no_such_experiment")


def unverified(path: Path) -> Path:
    """Drop the output hashes from the copy's manifest: a hand-written candidates file, or one from
    a version that did not record them, is read and checked row by row."""
    manifest = json.loads((path.parent / "manifest.json").read_text())
    del manifest["output_stat"], manifest["output_sha256"]
    (path.parent / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("damage", ["cut_mid_line", "cut_at_line_boundary"])
def test_damaged_candidates_file_names_the_stage_to_redo(ts, damage):
    path = copy_generate(ts, damage)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "cut_mid_line" else b"".join(data.splitlines(True)[:2]))
    with pytest.raises(TsalignError, match=f"{path} was changed or damaged.*stage=generate iteration=0 redo=true"):
        run(ts["outputs"], "rank", f"experiment_name={damage}", "redo=true")
    assert read_manifest(path.parent.parent / "rank") is None


def test_malformed_candidates_file_names_file_and_line(ts):
    path = unverified(copy_generate(ts, "bad_json"))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"prompt_id": "cut", "candidates": [\n' + "".join(lines[1:]))
    with pytest.raises(TsalignError, match=f"{path}:2: malformed JSON"):
        run(ts["outputs"], "rank", "experiment_name=bad_json", "redo=true")
    assert read_manifest(path.parent.parent / "rank") is None


def test_candidates_row_without_candidates_is_a_clear_error(ts):
    path = unverified(copy_generate(ts, "no_cands"))
    rows = read_jsonl(path)
    del rows[2]["candidates"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TsalignError, match=rf"{path}:3: not a candidates row.*candidates\[\]\.text"):
        run(ts["outputs"], "rank", "experiment_name=no_cands", "redo=true")


def test_two_label_classifier_teacher_is_refused(ts, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg = ts["rank_cfg"]
    tiny_teacher = base_model_dir(cfg, cfg.teacher)
    config = AutoConfig.from_pretrained(tiny_teacher, num_labels=2)
    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(two)
    with pytest.raises(TsalignError, match="exactly one"):
        run(ts["outputs"], "rank", "experiment_name=two", "rank.candidates_from=ts", f"teacher.path={two}",
            "teacher.tiny=null")
    assert read_manifest(ts["outputs"] / "two" / "iter_0" / "rank") is None


# ---------------------------------------------------------------- human pairs


def test_distill_on_human_pairs(tmp_path):
    data = write_human_pairs(tmp_path / "human.jsonl")
    _, manifest = run(tmp_path / "out", "distill", "experiment_name=human", "distill.source=human",
                      f"distill.human_data={data}", "distill.epochs=1", "distill.batch_size=4")
    counts = manifest["counts"]
    assert counts["train_pairs"] == 8 and counts["held_out_pairs"] == 2  # holdout_fraction 0.2 of 10
    assert counts["steps"] == 2
    assert counts["agreement_after"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # accuracy on 2 pairs, ties half
    metrics = json.loads((tmp_path / "out" / "human" / "iter_0" / "distill" / "metrics.json").read_text())
    assert metrics["label"] == "human" and metrics["after"]["pairs"] == 2
    assert 0.0 <= metrics["after"]["longer_wins"] <= 1.0
    assert (tmp_path / "out" / "human" / "iter_0" / "distill" / "student" / "config.json").is_file()


def fit_config(ts, cache: Path, data: Path, *overrides: str):
    cfg = configure(ts["outputs"], f"paths.cache={cache}", "distill.human_labels=null", *overrides)  # no download
    cfg.teacher.fit = FitSpec(data=str(data), holdout=2, epochs=1, batch_size=4, max_length=64)
    return cfg


def test_fitted_teacher_is_fitted_once_cached_and_reused(ts, tmp_path):
    cache, data = tmp_path / "cache", write_human_pairs(tmp_path / "human.jsonl")
    cfg = fit_config(ts, cache, data, "stage=rank", "experiment_name=fit", f"rank.candidates_from={ts['exp']}")
    run_stage(cfg, "rank")  # fits the teacher on first use
    fitted = [p for p in (cache / "fitted").iterdir() if p.is_dir()]  # lock files sit beside
    assert len(fitted) == 1 and fitted[0].name.startswith(cfg.teacher.name)
    report = json.loads((fitted[0] / "fit_report.json").read_text())
    assert report["train"]["train_pairs"] == 8 and report["held_out"]["pairs"] == 2
    assert report["recipe"]["data"] == str(data) and report["before"]["pairs"] == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in fitted[0].iterdir()}

    again = fit_config(ts, cache, data, "stage=rank", "experiment_name=fit")
    assert teacher_model_dir(again) == fitted[0]  # same recipe, a fresh config: the cached fit
    assert {p.name: p.stat().st_mtime_ns for p in fitted[0].iterdir()} == stamps  # not retrained
    assert len([p for p in (cache / "fitted").iterdir() if p.is_dir()]) == 1

    # distill then reports the student on the human pairs the teacher's fit held out, beside the teacher
    d_cfg = fit_config(ts, cache, data, "stage=distill", "experiment_name=fit")
    counts = run_stage(d_cfg, "distill")["counts"]
    assert counts["human_accuracy_before"] is not None and counts["human_accuracy_after"] is not None
    metrics = json.loads((ts["outputs"] / "fit" / "iter_0" / "distill" / "metrics.json").read_text())
    assert metrics["human_held_out"]["teacher"] == report["held_out"]

    # another recipe is another fit
    other = fit_config(ts, cache, data, "stage=rank", "experiment_name=fit")
    other.teacher.fit.epochs = 2
    assert teacher_model_dir(other) != fitted[0]
    assert len([p for p in (cache / "fitted").iterdir() if p.is_dir()]) == 2


def test_student_0_is_fitted_on_its_own_share_of_the_human_pairs(ts, tmp_path, capsys):
    """A student option with a fit recipe: rank at t = 0 scores with the fitted student (not the untrained
    head), fitted on pairs disjoint from the teacher's; an overlapping range is pointed out before the run."""
    cache, data = tmp_path / "cache", write_human_pairs(tmp_path / "human.jsonl")
    cfg = fit_config(ts, cache, data, "stage=rank", "experiment_name=student_fit", f"rank.candidates_from={ts['exp']}")
    cfg.teacher.fit.train_range = [0.0, 0.5]
    cfg.student.fit = FitSpec(data=str(data), holdout=2, epochs=1, batch_size=4, max_length=64, train_range=[0.5, 1.0])
    run_stage(cfg, "rank")
    assert "overlaps" not in capsys.readouterr().out
    reports = {p.name.split("-")[0]: json.loads((p / "fit_report.json").read_text()) for p in (cache / "fitted").iterdir() if p.is_dir()}
    student = student_base_dir(cfg)
    assert student.parent == cache / "fitted" and student.name.startswith(cfg.student.name)
    assert {r["train"]["train_pairs"] for r in reports.values()} == {4}  # 8 pairs after 2 held out, halved
    scores = read_jsonl(stage_dir(ts["outputs"] / "student_fit", 0, "rank") / "scores.jsonl", "scores")
    untrained = read_jsonl(stage_dir(ts["exp"], 0, "rank") / "scores.jsonl", "scores")
    assert [r["student_scores"] for r in scores] != [r["student_scores"] for r in untrained]

    cfg.student.fit.train_range = [0.25, 1.0]
    from tsalign.stages.checks import check_student

    check_student(cfg, None, "student.max_length", cfg.student.max_length)
    assert "student_0 learns pairs the teacher learned" in capsys.readouterr().out


def test_distill_mixes_in_student_0s_own_human_pairs(ts, tmp_path, capsys):
    """distill.human_anchor: the teacher's pairs are learnt beside student_0's own fit pairs (never its
    held-out ones); off, only the teacher's pairs (and replay) are trained."""
    cache, data, outputs = tmp_path / "cache", write_human_pairs(tmp_path / "human.jsonl"), tmp_path / "out"
    shutil.copytree(ts["exp"], outputs / "anchor")  # the same finished rank

    def distill(*overrides: str) -> dict:
        cfg = configure(outputs, f"paths.cache={cache}", "stage=distill", "experiment_name=anchor", "redo=true",
                        "distill.human_labels=null", *overrides)
        cfg.teacher.fit = FitSpec(data=str(data), holdout=2, epochs=1, batch_size=4, max_length=64, train_range=[0.0, 0.5])
        cfg.student.fit = FitSpec(data=str(data), holdout=2, epochs=1, batch_size=4, max_length=64, train_range=[0.5, 1.0])
        return run_stage(cfg, "distill")["counts"]

    anchored, alone = distill("distill.human_anchor=true"), distill()
    assert anchored["human_anchor_pairs"] == 4 and alone["human_anchor_pairs"] == 0
    assert anchored["train_pairs"] == alone["train_pairs"] + 4
    assert "4 human anchor" in capsys.readouterr().out


def test_fitted_teacher_cache_follows_the_data_content(ts, tmp_path):
    """FitSpec is documented as 'cached by content': editing the local pairs file must not reuse the old fit."""
    cache, data = tmp_path / "cache", write_human_pairs(tmp_path / "human.jsonl")
    first = teacher_model_dir(fit_config(ts, cache, data))
    write_human_pairs(data, [(q, r, c) for q, c, r in HUMAN])  # every label flipped, same path
    second = teacher_model_dir(fit_config(ts, cache, data))
    assert second != first, "a fit on the old pairs was reused after the pairs file changed"


def test_fit_recipe_composes_from_the_command_line(tmp_path):
    """`tsalign teacher.fit.data=<file> teacher.fit.holdout=2` on a teacher whose YAML has `fit: null`."""
    cfg = configure(tmp_path, f"teacher.fit.data={tmp_path / 'pairs.jsonl'}", "teacher.fit.holdout=2")
    assert cfg.teacher.fit.data == str(tmp_path / "pairs.jsonl") and cfg.teacher.fit.holdout == 2
    assert cfg.teacher.fit.epochs == FitSpec.epochs  # the rest from the schema's defaults



@pytest.mark.parametrize("mode", ["override", "filter"])
def test_preference_correction_never_trains_a_policy_answer_over_the_reference(ts, mode):
    """TSO's correction in rank: with the data's reference answers among the candidates and the teacher
    ranking all, no pair keeps a policy answer chosen over the reference; what was corrected is counted."""
    gen = ["generate.references=true", "experiment_name=tso"]
    run(ts["outputs"], "generate", *gen)
    cfg, manifest = run(ts["outputs"], "rank", *gen, "rank.selection=all", f"rank.correction={mode}", "redo=true")
    _, pairs, metrics = rank_outputs(Path(cfg.experiment_dir))
    c = metrics["correction"]
    assert c["mode"] == mode and "policy>reference" not in metrics["pair_sources"]
    assert c["agreed"] + c["overridden"] + c["filtered"] > 0  # the reference met a policy answer somewhere
    labelled = sum(1 for p in pairs if "reference" in (p["chosen_source"], p["rejected_source"]))
    assert c["agreed"] + (c["overridden"] if mode == "override" else 0) == labelled
    assert metrics["no_pair"].get("against_label", 0) == c["filtered"]
    plain_cfg, _ = run(ts["outputs"], "rank", *gen, "rank.selection=all", "redo=true")
    plain = rank_outputs(Path(plain_cfg.experiment_dir))[2]
    disagreed = plain["pair_sources"].get("policy>reference", 0)  # the teacher's verdicts against the label
    assert (c["overridden"] if mode == "override" else c["filtered"]) == disagreed
