"""The full pipeline on tiny models: evaluate, stage=loop (resume after kill -9 between and inside
stages), both multirun forms, and wandb offline runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_stage_inprocess

from tsalign.stages.registry import PIPELINE

FAST = ["model=tiny", "dpo.max_steps=2", "dpo.save_steps=1", "evaluate.control=true", "sampler.max_new_tokens=8"]


def manifest(exp: Path, t: int, stage: str) -> dict | None:
    p = exp / f"iter_{t}" / stage / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else None


def leftovers(exp: Path) -> list[Path]:
    """Temp files of atomic writes, and stage files in a directory without a manifest."""
    temp = [p for p in exp.rglob("*.tmp") if p.exists()]
    half = [d for d in exp.glob("iter_*/*") if d.is_dir() and not (d / "manifest.json").exists()
            and any(f.is_file() and not f.name.startswith(".") for f in d.iterdir())]
    return temp + half


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """One finished `tsalign stage=loop iterations=1` on tiny models (subprocess per stage)."""
    out = tmp_path_factory.mktemp("loop")
    done = run_cli([*FAST, f"paths.outputs={out}", "stage=loop", "iterations=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "default", done


def test_loop_runs_every_stage_and_prints_summary(looped):
    exp, done = looped
    for stage in PIPELINE:
        assert manifest(exp, 0, stage) is not None, stage
    assert "TS-Align summary" in done.stdout and "win_rate" in done.stdout
    assert "plot:" in done.stdout and (exp / "iter_0" / "evaluate" / "progress.png").is_file()
    assert not leftovers(exp)


def test_evaluate_metrics_are_consistent(looped):
    exp, _ = looped
    m = json.loads((exp / "iter_0" / "evaluate" / "metrics.json").read_text())
    assert m["n"] == 4 and m["win"] + m["tie"] + m["loss"] == 4
    assert m["win_rate"] == pytest.approx((m["win"] + 0.5 * m["tie"]) / 4)
    assert 0 <= m["ci_low"] <= m["win_rate"] <= m["ci_high"] <= 1
    assert m["control"]["n"] == 4 and m["policy"] == "pi_1"
    rows = [json.loads(line) for line in (exp / "iter_0" / "evaluate" / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["judge"]) == 2 for r in rows)
    assert m["judge"] == "tiny-bert-teacher" and m["judge_is_teacher"]
    # the base answers are cached for later iterations
    assert list((exp / "_eval_answers").glob("base-*.jsonl"))


def test_pi_0_answers_are_kept_per_machine_and_adopted_by_the_next_experiment(compose, tmp_path, monkeypatch):
    """evaluate's pi_0 answers (and the control's) go to <cache>/eval_answers once complete; another experiment of the
    same config copies them instead of sampling; a torn cache entry (answers without their stamp) is sampled again."""
    from tsalign.engines.sampling.hf import HFSampler
    from tsalign.stages import evaluate
    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny", f"paths.outputs={tmp_path}", "sampler.max_new_tokens=6"])
    model = base_model_dir(cfg, cfg.policy)
    cfg.paths.cache = str(tmp_path / "cache")  # the model stays in the shared test cache; the answers go here
    prompts = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(5)]
    calls = []
    real = HFSampler.generate_chunks
    monkeypatch.setattr(HFSampler, "generate_chunks", lambda self, chunks: calls.append(len(chunks)) or real(self, chunks))

    def experiment(name: str) -> tuple:
        key = evaluate.answers_key(cfg, prompts)
        runs = [(5, tmp_path / name / "_eval_answers" / f"base-{key}.jsonl"),
                (6, tmp_path / name / "_eval_answers" / f"control-{key}.jsonl")]
        calls.clear()
        return (*evaluate.base_answers(cfg, model, prompts, runs), list(calls))

    first, reused, sampled = experiment("a")
    assert not reused and sampled and first[0] != first[1]
    kept = tmp_path / "cache" / "eval_answers"
    names = sorted(p.name for p in kept.iterdir() if not p.name.endswith(".lock"))
    assert [n.split("-")[0] + n[n.index("."):] for n in names] == [
        "base.config", "base.jsonl", "control.config", "control.jsonl"]
    assert experiment("b") == (first, True, [])  # copied, nothing sampled, no model loaded
    base_kept = next(kept.glob("base-*.jsonl"))
    assert (tmp_path / "b" / "_eval_answers" / base_kept.name).read_bytes() == base_kept.read_bytes()
    next(kept.glob("control-*.config")).unlink()  # as a crash between writing the answers and their stamp leaves it
    again, reused, sampled = experiment("c")
    assert again == first and not reused and sampled  # seeded: the same answers, sampled again
    assert len(list(kept.glob("control-*.config"))) == 1
    prompts[0]["messages"] = [{"role": "user", "content": "Say something else."}]  # a prompts file edited in place
    edited, reused, sampled = experiment("a")  # the same experiment, the same prompt ids: not its old answers
    assert not reused and sampled and edited[0][0] != first[0][0]
    assert len(list(kept.glob("base-*.jsonl"))) == 2 and len(list((tmp_path / "a" / "_eval_answers").glob("base-*.jsonl"))) == 2


def test_rerun_of_finished_loop_starts_no_stage(looped):
    exp, _ = looped
    before = {s: manifest(exp, 0, s)["started_at"] for s in PIPELINE}
    t0 = time.time()
    again = run_cli([*FAST, f"paths.outputs={exp.parent}", "stage=loop", "iterations=1"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done, skipped") == len(PIPELINE)
    assert "starting" not in again.stdout
    assert {s: manifest(exp, 0, s)["started_at"] for s in PIPELINE} == before
    assert time.time() - t0 < 60


def test_changed_config_errors_then_redo_replaces_only_what_changed(looped):
    exp, _ = looped
    before = {s: manifest(exp, 0, s)["started_at"] for s in PIPELINE}
    changed = run_cli([*FAST, "dpo.beta=0.3", f"paths.outputs={exp.parent}", "stage=loop", "iterations=1"])
    assert changed.returncode == 2 and "redo=true" in changed.stderr and "dpo.beta" in changed.stderr
    assert "Traceback" not in changed.stderr
    redone = run_cli([*FAST, "dpo.beta=0.3", "redo=true", f"paths.outputs={exp.parent}", "stage=loop", "iterations=1"])
    assert redone.returncode == 0, redone.stderr[-2000:]
    after = {s: manifest(exp, 0, s)["started_at"] for s in PIPELINE}
    for s in ("generate", "rank", "distill"):  # untouched upstream work is kept
        assert after[s] == before[s], s
    assert manifest(exp, 0, "dpo")["config"]["dpo"]["beta"] == 0.3
    assert "iter_0/evaluate: starting" in redone.stdout  # its input (pi_1) changed


def _kill_when(cmd: list[str], ready, timeout: float = 600) -> None:
    """Start the loop, wait until `ready()` holds, then kill -9 the loop process (only it)."""
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "tsalign.cli", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the loop ended before the kill point"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the stage child dies with its parent (PR_SET_PDEATHSIG)


@pytest.mark.parametrize("kill_point", ["between", "inside_dpo"])
def test_loop_resumes_after_kill_9(tmp_path, kill_point):
    exp = tmp_path / "default"
    cmd = [*FAST, "dpo.max_steps=6", f"paths.outputs={tmp_path}", "stage=loop", "iterations=1"]
    if kill_point == "between":
        ready = lambda: manifest(exp, 0, "rank") is not None  # noqa: E731
    else:  # a complete DPO step checkpoint exists (Trainer writes trainer_state.json last), DPO unfinished
        ready = lambda: any((exp / "iter_0" / "dpo" / "_work" / "checkpoints").glob("checkpoint-*/trainer_state.json"))  # noqa: E731,E501
    _kill_when(cmd, ready)
    assert manifest(exp, 0, "evaluate") is None
    finished = {s: manifest(exp, 0, s) for s in PIPELINE if manifest(exp, 0, s)}
    assert "generate" in finished and "rank" in finished
    assert not [p for p in exp.rglob("*.tmp")]

    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    for s, m in finished.items():  # finished work is not redone
        assert manifest(exp, 0, s)["started_at"] == m["started_at"], s
        assert f"iter_0/{s}: done, skipped" in done.stdout
    assert manifest(exp, 0, "evaluate") is not None
    assert not leftovers(exp)
    if kill_point == "inside_dpo":
        counts = manifest(exp, 0, "dpo")["counts"]
        assert counts.get("resumed_from_step", 0) >= 1, counts


def test_multirun_in_pipeline_order_shares_one_experiment(tmp_path):
    done = run_cli(["-m", "model=tiny", "dpo.max_steps=1", "sampler.max_new_tokens=8", f"paths.outputs={tmp_path}",
                    "iteration=0,1", "stage=generate,rank,distill,dpo"])
    assert done.returncode == 0, done.stderr[-3000:]
    exp = tmp_path / "default"
    for t in (0, 1):
        for s in ("generate", "rank", "distill", "dpo"):
            assert manifest(exp, t, s) is not None, (t, s)
    assert manifest(exp, 1, "generate")["config"]["policy_used"] == "pi_1"
    assert manifest(exp, 1, "rank")["config"]["student_used"] == "student_1"
    assert manifest(exp, 1, "generate")["inputs"]["policy"]["path"].endswith("iter_0/dpo/policy")


def test_multirun_sweep_gives_each_job_its_own_experiment(tmp_path):
    done = run_cli(["-m", *FAST, "dpo.max_steps=1", f"paths.outputs={tmp_path}", "stage=loop",
                    "seed=1,2", "dpo.beta=0.05"])  # a single value does not name a directory
    assert done.returncode == 0, done.stderr[-3000:]
    dirs = sorted(p.name for p in (tmp_path / "default").iterdir() if p.is_dir() and not p.name.startswith("_"))
    assert dirs == ["seed=1", "seed=2"], dirs  # only swept keys name a job's experiment
    for d in dirs:
        exp = tmp_path / "default" / d
        assert manifest(exp, 0, "evaluate") is not None
        assert manifest(exp, 0, "dpo")["config"]["dpo"]["beta"] == 0.05
    assert manifest(tmp_path / "default" / dirs[0], 0, "generate")["config"]["seed"] == 1
    assert done.stdout.count("TS-Align summary") == 2


def test_wandb_offline_runs_appear(tmp_path):
    cfg, _ = run_stage_inprocess("generate", tmp_path, ["logger=wandb"])
    run_stage_inprocess("rank", tmp_path, ["logger=wandb"])
    runs = sorted((Path(cfg.experiment_dir) / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert all(any(r.glob("*.wandb")) for r in runs)


def test_evaluate_with_an_independent_judge(looped):
    """evaluate.judge names a conf/teacher option: the judge is that model, not the training teacher."""
    exp, _ = looped
    path = exp / "iter_0" / "evaluate" / "judgements.jsonl"
    before = [json.loads(line)["judge"] for line in path.read_text().splitlines()]  # judged by teacher seed 7
    # the training teacher becomes seed 3; the judge is conf/teacher/tiny.yaml (seed 7)
    _, m = run_stage_inprocess("evaluate", exp.parent, [*FAST[1:], "teacher.seed=3", "evaluate.judge=tiny",
                                                        "redo=true"])
    metrics = json.loads((exp / "iter_0" / "evaluate" / "metrics.json").read_text())
    assert metrics["judge"] == "tiny-bert-teacher" and metrics["judge_is_teacher"] is False
    assert m["config"]["judge"]["seed"] == 7 and m["config"]["teacher"]["seed"] == 3
    after = [json.loads(line)["judge"] for line in path.read_text().splitlines()]
    assert [x for r in after for x in r] == pytest.approx([x for r in before for x in r], rel=1e-5)


def test_unknown_judge_option_lists_the_options():
    from tsalign.errors import TsalignError
    from tsalign.stages.factory import teacher_option

    with pytest.raises(TsalignError, match="minilm_rm"):
        teacher_option("no_such_judge")
    assert teacher_option("smollm2_judge").kind == "judge"
