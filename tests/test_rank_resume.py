"""rank keeps finished scorer chunks: a crash inside the teacher loses one chunk at most."""

from __future__ import annotations

import json

import pytest
from conftest import run_stage_inprocess

import tsalign.engines.scoring.resumable
import tsalign.stages.rank as rank

NO_AUDIT = ["rank.audit_fraction=0"]  # the teacher's chunks counted exactly (the audit has its own test)


def test_rank_resumes_teacher_chunks_after_a_crash(tmp_path, monkeypatch):
    run_stage_inprocess("generate", tmp_path)  # model=tiny: 4 prompts x K=3
    monkeypatch.setattr(tsalign.engines.scoring.resumable, "SCORE_CHUNK", 2)
    real_open = rank.open_scorer
    seen: list[tuple[str, int]] = []

    def spying_open(cfg, spec, model_dir, crash_on: int | None = None):
        scorer = real_open(cfg, spec, model_dir)
        score = scorer.score_groups

        def score_groups(prompts, groups):
            seen.append((spec.name, len(groups)))
            if spec.name == cfg.teacher.name and crash_on is not None and len(
                    [s for s in seen if s[0] == spec.name]) == crash_on:
                raise RuntimeError("simulated crash inside the teacher")
            return score(prompts, groups)

        scorer.score_groups = score_groups
        return scorer

    monkeypatch.setattr(rank, "open_scorer", lambda cfg, spec, d: spying_open(cfg, spec, d, crash_on=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage_inprocess("rank", tmp_path, NO_AUDIT)
    rank_dir = tmp_path / "default" / "iter_0" / "rank"
    assert not (rank_dir / "manifest.json").exists() and not (rank_dir / "pairs.jsonl").exists()
    teacher_calls_before = [n for name, n in seen if name == "tiny-bert-teacher"]
    assert teacher_calls_before == [2, 2]  # the second chunk crashed

    seen.clear()
    monkeypatch.setattr(rank, "open_scorer", lambda cfg, spec, d: spying_open(cfg, spec, d))
    _, manifest = run_stage_inprocess("rank", tmp_path, NO_AUDIT)
    assert seen == [("tiny-bert-teacher", 2)]  # the student is not rerun; only the lost teacher chunk is
    metrics = json.loads((rank_dir / "metrics.json").read_text())
    assert metrics["teacher_calls"] == 8 and metrics["student_calls"] == 12  # counted across both runs
    assert manifest["counts"]["pairs"] + sum(metrics["no_pair"].values()) == 4

    # the resumed result equals an uninterrupted run
    monkeypatch.setattr(rank, "open_scorer", real_open)
    run_stage_inprocess("generate", tmp_path / "clean")
    run_stage_inprocess("rank", tmp_path / "clean", NO_AUDIT)
    clean = (tmp_path / "clean" / "default" / "iter_0" / "rank" / "scores.jsonl").read_text()
    assert clean == (rank_dir / "scores.jsonl").read_text()
