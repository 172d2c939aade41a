"""Failure paths (issue 14), replayed on the tiny models: each ends in one `tsalign: error:` line naming
the key or file to fix, exit 2, and leaves every finished artifact byte-identical.

One finished iteration 0 (generate, rank, distill, dpo) is built once; each failing command is run
against it with redo=true, so a failure that lost or rewrote finished work would show here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_stage_inprocess

from tsalign.artifacts.store import read_manifest, stage_dir
from tsalign.errors import TsalignError
from tsalign.stages.lineage import base_model_dir
from tsalign.training.divergence import check_weights, divergence

BASE = ["experiment_name=f", "data.max_prompts=2", "dpo.max_steps=2", "dpo.max_length=96", "device=cpu"]
FINISHED = ("generate", "rank", "distill", "dpo")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished iteration 0 and the bytes of every file in it."""
    outputs = tmp_path_factory.mktemp("failures")
    for stage in FINISHED:
        cfg, _ = run_stage_inprocess(stage, outputs, BASE)
    return {"outputs": outputs, "exp": Path(cfg.experiment_dir), "cfg": cfg}


def snapshot(exp: Path) -> dict[str, str]:
    """sha256 of every file of the finished stages (dot-folders: staging of a redo, locks, are not finished work)."""
    files = [p for s in FINISHED for p in sorted(stage_dir(exp, 0, s).rglob("*")) if p.is_file()]
    return {str(p.relative_to(exp)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def untouched(done):
    """Asserts after the test that no finished artifact changed."""
    before = snapshot(done["exp"])
    assert len(before) > 10 and all(read_manifest(stage_dir(done["exp"], 0, s)) for s in FINISHED)
    yield done
    assert snapshot(done["exp"]) == before


def cli(args, env: dict | None = None, drop: tuple[str, ...] = (), cwd: Path | None = None):
    full = {k: v for k, v in os.environ.items() if k not in drop and k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "tsalign.cli", *args], cwd=str(cwd or REPO), env={**full, **(env or {})},
                          capture_output=True, text=True, timeout=600, check=False)


def error_line(done_process) -> str:
    """Exit 2, no traceback, and exactly one `tsalign: error:` line, the last thing on stderr."""
    lines = [line for line in done_process.stderr.splitlines() if line.strip()]
    assert done_process.returncode == 2, done_process.stdout + done_process.stderr
    assert "Traceback" not in done_process.stderr, done_process.stderr
    errors = [line for line in lines if line.startswith("tsalign: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], done_process.stderr
    return errors[0]


def redo(done, *overrides: str, stage: str = "rank", env=None, drop=()) -> str:
    """`tsalign stage=<stage> redo=true <overrides>` on the finished experiment: its error line."""
    return error_line(cli(["model=tiny", f"paths.outputs={done['outputs']}", *BASE, f"stage={stage}", "redo=true",
                           *overrides], env, drop))


# ---------------------------------------------------------------- diverging training (item 2)


@pytest.mark.parametrize("lr", ["1e3", "1e30"])
def test_diverging_dpo_is_an_error_and_keeps_the_policy(untouched, lr):
    with pytest.raises(TsalignError, match=rf"DPO diverged at step \d+/2 \(.*\).*lower optimizer\.learning_rate "
                                           rf"{re.escape(f'(now {float(lr)!r})')}"):
        run_stage_inprocess("dpo", untouched["outputs"], [*BASE, f"optimizer.learning_rate={lr}", "redo=true"])


def test_diverging_distill_exits_2_and_keeps_the_student(untouched):
    line = redo(untouched, "distill.learning_rate=1e30", stage="distill")
    assert "distill diverged" in line and "distill.learning_rate (now 1e+30)" in line


def test_distill_at_learning_rate_1e3_is_refused(untouched):
    """Its loss explodes, or it fits the pairs with weights in the thousands: either way nothing is saved."""
    with pytest.raises(TsalignError, match=r"distill diverged .*(exploded|largest weight grew).*"
                                           r"distill\.learning_rate \(now 1000\.0\)"):
        run_stage_inprocess("distill", untouched["outputs"], [*BASE, "distill.learning_rate=1e3", "redo=true"])


def test_teacher_fit_that_diverges_names_its_key_and_saves_nothing(done, tmp_path):
    from tsalign.training.reward_model import train_reward_model

    cfg = done["cfg"]
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}],
              "chosen": [{"role": "assistant", "content": f"a good answer {i}"}],
              "rejected": [{"role": "assistant", "content": "no"}]} for i in range(8)]
    out = tmp_path / "fitted"
    with pytest.raises(TsalignError, match=r"diverged .*teacher\.fit\.learning_rate \(now 1e\+30\)"):
        train_reward_model(base_model_dir(cfg, cfg.teacher), out, pairs, epochs=2, batch_size=4, learning_rate=1e30,
                           lr_key="teacher.fit.learning_rate", what="the fit of teacher 'x'")
    assert not out.exists() and not list(tmp_path.glob(".fitted*"))


def test_divergence_rule():
    assert divergence({"loss": 0.69}, 0.69) is None
    assert divergence({"loss": 3.0}, 0.01) is None  # tenfold, but under the floor of 5
    assert "exploded" in divergence({"loss": 435318.0}, 0.69)
    assert "grad_norm is nan" in divergence({"loss": 0.7, "grad_norm": float("nan")}, 0.69)
    assert "loss is inf" in divergence({"loss": float("inf")}, None)


def test_dpo_callback_stops_a_finite_explosion():
    from types import SimpleNamespace

    from tsalign.stages.dpo import stage_callback

    state = SimpleNamespace(global_step=2, max_steps=8, log_history=[{"loss": 0.6931}, {"loss": 435318.0}])
    with pytest.raises(TsalignError, match=r"DPO diverged at step 2/8 \(loss 4\.353e\+05 exploded.*"
                                           r"optimizer\.learning_rate \(now 1000\.0\)"):
        stage_callback(1000.0).on_log(None, state, SimpleNamespace(), logs={"loss": 435318.0})


def test_weights_that_blew_up_are_never_saved():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(0.5)
    check_weights(model, "distill", "distill.learning_rate", 1.0, largest_before=0.5)
    with torch.no_grad():
        model.weight[0, 0] = 2e4  # past 100 x 0.5 and past the floor of 1000
    with pytest.raises(TsalignError, match=r"the largest weight grew from 0\.5 to 2e\+04.*distill\.learning_rate"):
        check_weights(model, "distill", "distill.learning_rate", 1.0, largest_before=0.5)


def test_nan_weights_are_never_saved():
    model = torch.nn.Linear(2, 2)
    check_weights(model, "DPO", "optimizer.learning_rate", 1.0, largest_before=1.0)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TsalignError, match="weight weight is not finite.*optimizer.learning_rate"):
        check_weights(model, "DPO", "optimizer.learning_rate", 1.0)


# ---------------------------------------------------------------- refused before any model loads (item 4)


def test_bad_teacher_path_fails_before_the_student_scores(untouched, monkeypatch):
    import tsalign.stages.rank as rank

    opened = []
    monkeypatch.setattr(rank, "open_scorer", lambda *a, **k: opened.append(a) or pytest.fail("a model was loaded"))
    with pytest.raises(TsalignError, match=r"^teacher\.path=/no/such/teacher: model '/no/such/teacher' not found"):
        run_stage_inprocess("rank", untouched["outputs"], [*BASE, "teacher.path=/no/such/teacher", "teacher.tiny=null",
                                                           "redo=true"])
    assert opened == [] and not (stage_dir(untouched["exp"], 0, ".rank.redo")).exists()


@pytest.mark.parametrize("stage,key", [("generate", "policy"), ("rank", "student"), ("rank", "teacher"),
                                       ("dpo", "policy")])
def test_missing_model_path_names_its_key(untouched, stage, key):
    line = redo(untouched, f"{key}.path=/no/such/{key}", stage=stage)
    assert f"{key}.path=/no/such/{key}:" in line


def test_a_model_folder_without_weights_or_tokenizer_says_what_it_lacks(tmp_path):
    """transformers' own message is a list over five lines (and names no file): one line, with what is missing."""
    from tsalign.engines.models import load_causal_lm, load_tokenizer

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TsalignError) as e:
        load_tokenizer(tmp_path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"cannot load model from {tmp_path}: ")
    assert "(1) a `tokenizers` library serialization file" in line
    assert line.endswith("the folder has no weights (*.safetensors or *.bin) and no tokenizer files (tokenizer.json)")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TsalignError, match=r"the folder has no weights \(\*\.safetensors or \*\.bin\)$"):
        load_causal_lm(tmp_path)


def test_causal_lm_as_the_student_is_refused(untouched):
    cfg = untouched["cfg"]
    causal = base_model_dir(cfg, cfg.policy)
    line = redo(untouched, f"student.path={causal}", "student.tiny=null")
    assert f"student.path={causal} is a causal LM (LlamaForCausalLM)" in line
    assert "sequence classifier" in line and "student=minilm" in line


@pytest.mark.parametrize("stage,override,needle", [
    ("rank", "student.max_length=2048", "student.max_length=2048 is longer than student.path="),
    ("rank", "teacher.max_length=600", "teacher.max_length=600 is longer than teacher.path="),
    ("distill", "distill.max_length=1024", "distill.max_length=1024 is longer than"),
    ("dpo", "dpo.max_length=9000", "dpo.max_length=9000 is longer than"),
])
def test_max_length_beyond_the_models_positions(untouched, stage, override, needle):
    line = redo(untouched, override, stage=stage)
    assert needle in line and "positions" in line and f"set {override.split('=')[0]}=" in line


def test_rank_refuses_candidates_with_k_1(tmp_path):
    outputs = tmp_path / "out"
    args = ["experiment_name=k1", "data.max_prompts=1", "generate.num_candidates=1", "sampler.max_new_tokens=2"]
    run_stage_inprocess("generate", outputs, args)
    line = error_line(cli(["model=tiny", f"paths.outputs={outputs}", *args, "stage=rank"]))
    assert "rank needs at least 2 candidates per prompt" in line and "K=1" in line
    assert "generate.num_candidates=4 redo=true" in line
    assert not stage_dir(outputs / "k1", 0, "rank").exists()


def test_loop_refuses_k_1_before_any_stage(tmp_path):
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path}", "stage=loop", "generate.num_candidates=1"]))
    assert "generate.num_candidates=1" in line and "at least 2" in line
    assert not list(tmp_path.glob("*/iter_0"))


def test_max_new_tokens_0_is_refused(tmp_path):
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path}", "sampler.max_new_tokens=0"]))
    assert "sampler.max_new_tokens must be >= 1" in line


# ---------------------------------------------------------------- prompt files


def prompt_rows(n: int = 12) -> list[dict]:
    return [{"instruction": f"Question number {i}: what is {i} + {i}?"} for i in range(n)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_prompt_file_names_file_and_line(tmp_path, suffix):
    rows = prompt_rows()
    rows[4]["instruction"] = "caf\udce9"  # a lone latin-1 byte once written
    path = tmp_path / f"prompts{suffix}"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if suffix == ".jsonl" else \
        "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'out'}", "data=file", f"data.path={path}"]))
    assert f"{path}:{5 if suffix == '.jsonl' else 6}: not UTF-8 text (byte 0xe9)" in line
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_one_empty_prompt_is_skipped_and_counted(tmp_path):
    rows = prompt_rows()
    rows[3]["instruction"] = "   "
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, manifest = run_stage_inprocess("generate", tmp_path / "out", ["data=file", f"data.path={path}",
                                                                     "data.max_prompts=1", "sampler.max_new_tokens=2"])
    assert manifest["counts"]["empty_prompts_skipped"] == 1 and manifest["counts"]["prompts"] == 1


def test_a_file_of_empty_prompts_is_an_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": ""}) + "\n" for _ in range(12)))
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'out'}", "data=file", f"data.path={path}"]))
    assert f"{path}: no prompts: all 12 rows have an empty prompt" in line and "data.prompt_field" in line


# ---------------------------------------------------------------- output folders


def test_output_folder_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'file.txt' / 'out'}"]))
    assert f"paths.outputs={tmp_path / 'file.txt' / 'out'} cannot be written ({tmp_path / 'file.txt'} is a file" in line


def test_stage_folder_that_cannot_be_created(tmp_path):
    """Past Hydra's run folder: the experiment's iter_0 is a file, so the stage lock cannot be made."""
    (tmp_path / "out" / "default").mkdir(parents=True)
    (tmp_path / "out" / "default" / "iter_0").write_text("in the way")
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'out'}", "data.max_prompts=1"]))
    assert "cannot write" in line and "iter_0" in line and "paths.outputs" in line


def test_read_only_output_folder(tmp_path):
    """A read-only bind mount (root ignores chmod 0o555 but not a read-only mount); skipped where
    mounting is not allowed."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
    try:
        if not mounted:
            pytest.skip("cannot make a read-only mount here (needs root and CAP_SYS_ADMIN)")
        line = error_line(cli(["model=tiny", f"paths.outputs={ro / 'out'}"]))
        assert f"paths.outputs={ro / 'out'} cannot be written ({ro}: Read-only file system)" in line
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_output_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = error_line(cli(["model=tiny", f"paths.outputs={locked / 'out'}"]))
    assert "Permission denied" in line and "paths.outputs" in line


# ---------------------------------------------------------------- tracking


def test_wandb_online_without_an_api_key(tmp_path):
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'out'}", "data.max_prompts=1", "logger=wandb",
                           "logger.mode=online"], env={"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)},
                          drop=("WANDB_API_KEY", "WANDB_MODE", "NETRC")))
    assert "logger.mode=online needs a W&B API key" in line and "wandb login" in line
    assert not list((tmp_path / "out").rglob("manifest.json")) and not list((tmp_path / "out").rglob("generate"))


def test_empty_wandb_mode_in_the_environment(tmp_path):
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path / 'out'}", "logger=wandb"], env={"WANDB_MODE": ""}))
    assert "WANDB_MODE=''" in line and "unset WANDB_MODE" in line


# ---------------------------------------------------------------- damaged finished work (item 3, end to end)


def test_generate_with_a_damaged_candidates_file_is_not_done(done, tmp_path):
    exp = tmp_path / "copy"
    shutil.copytree(stage_dir(done["exp"], 0, "generate"), stage_dir(exp, 0, "generate"))
    path = stage_dir(exp, 0, "generate") / "candidates.jsonl"
    path.write_bytes(path.read_bytes().splitlines(True)[0])  # cut at a line boundary: still valid JSONL
    manifest = (path.parent / "manifest.json").read_bytes()
    line = error_line(cli(["model=tiny", f"paths.outputs={tmp_path}", *BASE, "experiment_name=copy"]))
    assert f"{path} was changed or damaged" in line and "stage=generate iteration=0 redo=true" in line
    assert (path.parent / "manifest.json").read_bytes() == manifest
