"""The status view on hand-made experiment folders: done, partial (how far), redo in progress, running,
not started; the command to run next; and that it loads neither torch nor transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from tsalign.artifacts.store import stage_dir, stage_lock
from tsalign.views.status import experiment_status, format_status, main, next_commands


def write_manifest(exp: Path, t: int, stage: str, counts: dict, wall: float = 1.5, config: dict | None = None) -> Path:
    d = stage_dir(exp, t, stage)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "iteration": t, "config": config or {},
                                                 "counts": counts, "wall_time_s": wall}))
    return d


def write_lines(path: Path, n: int, torn_tail: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"prompt_id": f"p{i}"}) + "\n" for i in range(n))
    path.write_text(text + ('{"prompt_id": "p9' if torn_tail else ""))


def save_hydra(exp: Path, t: int, stage: str, data: dict, overrides: list[str]) -> None:
    """What stage=loop leaves for a child: <exp>/_hydra/iter_<t>_<stage>/.hydra/{config,overrides}.yaml."""
    d = exp / "_hydra" / f"iter_{t}_{stage}" / ".hydra"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("data:\n" + "".join(f"  {k}: {v}\n" for k, v in data.items()))
    (d / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def row(rows: list[dict], t: int, stage: str) -> dict:
    return next(r for r in rows if r["iteration"] == t and r["stage"] == stage)


def states(rows: list[dict]) -> dict[tuple[int, str], str]:
    return {(r["iteration"], r["stage"]): r["state"] for r in rows}


def half_finished(tmp_path: Path) -> Path:
    """iter_0 done up to distill, dpo stopped at step 2 of 8 (a newer checkpoint was cut by a crash)."""
    exp = tmp_path / "outputs" / "exp"
    write_manifest(exp, 0, "generate", {"prompts": 16, "candidates": 64, "tokens_per_s": 90.5}, 111.0,
                   {"data": {"prompts_per_iteration": 16, "max_prompts": None, "eval_prompts": 32}})
    write_manifest(exp, 0, "rank", {"pairs": 14, "teacher_calls": 32, "student_teacher_agreement": 0.69}, 5.1)
    write_manifest(exp, 0, "distill", {"train_pairs": 12, "agreement_before": 0.5, "agreement_after": 1.0}, 23.0)
    ckpts = stage_dir(exp, 0, "dpo") / "_work" / "checkpoints"
    (ckpts / "checkpoint-2").mkdir(parents=True)
    (ckpts / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 8}))
    (ckpts / "checkpoint-4").mkdir()
    (ckpts / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "max_')  # cut by a crash
    return exp


def test_half_finished_experiment_names_the_partial_stage_and_how_far(tmp_path):
    exp = half_finished(tmp_path)
    rows = experiment_status(exp, None)
    assert states(rows) == {(0, "generate"): "done", (0, "rank"): "done", (0, "distill"): "done",
                            (0, "dpo"): "partial", (0, "evaluate"): "not started"}
    gen = row(rows, 0, "generate")
    assert gen["wall_time_s"] == 111.0 and gen["counts"] == {"prompts": 16, "candidates": 64, "tokens_per_s": 90.5}
    dpo = row(rows, 0, "dpo")
    assert (dpo["progress"]["done"], dpo["progress"]["total"]) == (2, 8) and not dpo["running"]
    assert "step 2 of 8" in dpo["progress"]["detail"]
    text = format_status(exp, rows)
    assert "dpo       partial, stopped: step 2 of 8 saved" in text
    assert f"tsalign stage=dpo iteration=0 paths.outputs={exp.parent} experiment_name=exp" in text
    assert "tsalign stage=loop iterations=1" in text


def test_partial_generate_counts_complete_rows_against_the_saved_plan(tmp_path):
    exp = tmp_path / "exp"
    write_lines(stage_dir(exp, 0, "generate") / "_work" / "candidates.partial.jsonl", 3, torn_tail=True)
    save_hydra(exp, 0, "generate", {"prompts_per_iteration": 64, "max_prompts": 10},
               ["model=tiny", "stage=generate", "iteration=0", "experiment_name=exp", "hydra.run.dir=/x/y"])
    rows = experiment_status(exp, 2)
    gen = row(rows, 0, "generate")
    assert gen["state"] == "partial" and (gen["progress"]["done"], gen["progress"]["total"]) == (3, 10)
    assert "3 of 10 prompts sampled" in gen["progress"]["detail"]
    assert {r["state"] for r in rows if r["iteration"] == 1} == {"not started"}
    first, loop = next_commands(exp, rows)
    # the saved overrides come along; the ones that place the run (stage, iteration, hydra.*) do not
    assert first.startswith("tsalign stage=generate iteration=0 model=tiny paths.outputs=")
    assert "hydra.run.dir" not in first and first.count("stage=") == 1
    assert loop.startswith("tsalign stage=loop iterations=2 model=tiny")


def test_partial_rank_reports_student_and_teacher_chunks(tmp_path):
    exp = tmp_path / "exp"
    write_manifest(exp, 0, "generate", {"prompts": 100})
    work = stage_dir(exp, 0, "rank") / "_work"
    write_lines(work / "student.partial.jsonl", 64)
    write_lines(work / "teacher.partial.jsonl", 0)
    rank = row(experiment_status(exp, None), 0, "rank")
    assert rank["state"] == "partial"
    assert (rank["progress"]["student"], rank["progress"]["teacher"], rank["progress"]["total"]) == (64, 0, 100)
    assert "student scored 64 of 100 prompts (1 of 2 chunks of 64)" in rank["progress"]["detail"]


def test_partial_evaluate_counts_policy_and_shared_base_answers(tmp_path):
    exp = tmp_path / "exp"
    for stage in ("generate", "rank", "distill", "dpo"):
        write_manifest(exp, 0, stage, {}, config={"data": {"prompts_per_iteration": 4, "eval_prompts": 6}})
    write_lines(stage_dir(exp, 0, "evaluate") / "_work" / "policy_answers.jsonl", 2)
    write_lines(exp / "_eval_answers" / "base-abc.jsonl", 6)
    ev = row(experiment_status(exp, None), 0, "evaluate")
    assert ev["state"] == "partial" and ev["progress"]["policy_answers"] == 2 and ev["progress"]["prompts"] == 6
    assert "pi_1 answered 2 of 6" in ev["progress"]["detail"] and "pi_0 6 of 6" in ev["progress"]["detail"]


def test_redo_in_progress_and_a_running_stage(tmp_path):
    exp = half_finished(tmp_path)
    staging = stage_dir(exp, 0, "distill").with_name(".distill.redo")
    staging.mkdir()
    rows = experiment_status(exp, None)
    distill = row(rows, 0, "distill")
    assert distill["state"] == "redo" and distill["counts"]["train_pairs"] == 12  # the finished one still counts
    assert "nothing saved yet" in distill["progress"]["detail"]
    assert next_commands(exp, rows)[0].startswith("tsalign stage=distill iteration=0 redo=true")
    with stage_lock(stage_dir(exp, 0, "distill")):  # what a running stage holds
        rows = experiment_status(exp, None)
        assert row(rows, 0, "distill")["running"] and not row(rows, 0, "dpo")["running"]
        assert "is running now" in next_commands(exp, rows)[0]
        assert "redo in progress (the finished outputs stay until it ends), running" in format_status(exp, rows)


def test_between_two_stages_of_a_running_loop_status_says_so_and_a_second_loop_is_refused(tmp_path):
    import pytest

    from tsalign.artifacts.store import loop_lock
    from tsalign.errors import TsalignError

    exp = half_finished(tmp_path)
    assert next_commands(exp, experiment_status(exp, None))[0].startswith("tsalign stage=dpo iteration=0")
    with loop_lock(exp):  # what stage=loop holds from its first stage to its last, between them too
        rows = experiment_status(exp, None)
        assert not row(rows, 0, "dpo")["running"]
        assert next_commands(exp, rows) == ["(a stage=loop is running this experiment: iter_0/dpo is next; wait for it)"]
        with pytest.raises(TsalignError, match=rf"another stage=loop \(pid {os.getpid()}\) is running {exp}"):
            with loop_lock(exp):
                pass
    assert next_commands(exp, experiment_status(exp, None))[0].startswith("tsalign stage=dpo iteration=0")


def test_finished_stage_without_manifest_and_finished_experiment(tmp_path, capsys):
    exp = tmp_path / "outputs" / "exp"
    for stage in ("generate", "rank", "distill", "dpo"):
        write_manifest(exp, 0, stage, {})
    write_manifest(exp, 0, "evaluate", {"n": 32, "win_rate": 0.55, "ci_low": 0.38, "ci_high": 0.7})
    write_lines(stage_dir(exp, 1, "generate") / "candidates.jsonl", 2)  # outputs written, crash before manifest
    rows = experiment_status(exp, None)
    assert row(rows, 1, "generate")["state"] == "partial"
    assert "candidates.jsonl written, manifest not yet" in row(rows, 1, "generate")["progress"]["detail"]
    assert [r["iteration"] for r in experiment_status(exp, 1)][-1] == 1  # on disk: shown although not planned
    assert next_commands(exp, experiment_status(exp, 1))[0].startswith("tsalign stage=generate iteration=1 ")
    shutil.rmtree(exp / "iter_1")
    assert next_commands(exp, experiment_status(exp, 1))[0].startswith("tsalign stage=loop iterations=2")
    main(exp, 1)
    assert "evaluate  done in 1.5 s: n 32, win_rate 0.55, ci_low 0.38, ci_high 0.7" in capsys.readouterr().out
    sweep = tmp_path / "outputs" / "sweep"
    write_manifest(sweep / "seed=1", 0, "generate", {"prompts": 3})
    main(sweep)
    out = capsys.readouterr().out
    assert "status: " + str(sweep / "seed=1") in out and "experiment_dir='" in out  # one view per sweep job
    main(tmp_path / "nothing")
    assert "no experiment at" in capsys.readouterr().out


def test_status_imports_no_model_library(tmp_path):
    exp = half_finished(tmp_path)
    code = ("import sys; from pathlib import Path; import tsalign.views.status as s; s.main(Path(sys.argv[1])); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'trl', 'vllm')); "
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code, str(exp)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "step 2 of 8" in done.stdout


def finished_with_outputs(exp: Path, t: int, stage: str, files: dict[str, str]) -> Path:
    """A stage finished through StageRun (manifest with its outputs' hashes), as the runner leaves it."""
    from tsalign.artifacts.store import StageRun

    run = StageRun(stage_dir(exp, t, stage), stage, t, {"iteration": t})
    work = run.begin()
    outputs = {}
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
        outputs[rel.split("/")[0]] = work / rel.split("/")[0]
    run.finish({"prompts": 2}, outputs)
    return run.directory


def test_status_names_outputs_deleted_or_changed_after_their_stage_finished(tmp_path):
    exp = tmp_path / "outputs" / "exp"
    gen = finished_with_outputs(exp, 0, "generate", {"candidates.jsonl": '{"prompt_id": "p0"}\n'})
    dpo = finished_with_outputs(exp, 0, "dpo", {"policy/model.safetensors": "weights", "policy/config.json": "{}"})
    assert states(experiment_status(exp, None))[(0, "generate")] == "done"
    (gen / "candidates.jsonl").unlink()
    (dpo / "policy" / "model.safetensors").write_text("other weights")
    rows = experiment_status(exp, None)
    assert states(rows)[(0, "generate")] == "damaged" and states(rows)[(0, "dpo")] == "damaged"
    text = format_status(exp, rows)
    assert "generate  DAMAGED: finished, but candidates.jsonl (missing) since" in text, text
    assert "dpo       DAMAGED: finished, but policy (changed) since" in text, text
    assert f"tsalign stage=generate iteration=0 redo=true paths.outputs={exp.parent} experiment_name=exp" in text
    shutil.rmtree(dpo / "policy")
    assert row(experiment_status(exp, None), 0, "dpo")["damaged"] == ["policy (missing)"]
