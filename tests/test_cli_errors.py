"""User mistakes end in one clear line on stderr and a non-zero exit, never a traceback or half a stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _fail(run_cli, tmp_path, *args):
    out = tmp_path / "outputs"
    done = run_cli(["model=tiny", f"paths.outputs={out}", *args], cwd=tmp_path)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not list(out.rglob("candidates.jsonl")) and not list(out.rglob("manifest.json"))
    return done


def _tsalign_error(done) -> str:
    """The one `tsalign: error:` line, which is also the last thing on stderr."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tsalign: error:")]
    assert len(errors) == 1, done.stderr
    assert lines[-1] == errors[0], done.stderr
    assert done.returncode == 2
    return errors[0]


def test_missing_prompt_file(run_cli, tmp_path):
    missing = tmp_path / "nowhere" / "prompts.jsonl"
    line = _tsalign_error(_fail(run_cli, tmp_path, "data=file", f"data.path={missing}"))
    assert str(missing) in line and "data.path" in line


def test_data_file_without_path(run_cli, tmp_path):
    line = _tsalign_error(_fail(run_cli, tmp_path, "data=file"))
    assert "data.path" in line


def test_malformed_jsonl_prompt_file(run_cli, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [json.dumps({"instruction": f"question {i}"}) for i in range(12)]
    rows[6] = '{"instruction": "broken'
    path.write_text("\n".join(rows) + "\n")
    line = _tsalign_error(_fail(run_cli, tmp_path, "data=file", f"data.path={path}"))
    assert f"{path}:7" in line


def test_prompt_file_without_the_field(run_cli, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(12)))
    line = _tsalign_error(_fail(run_cli, tmp_path, "data=file", f"data.path={path}"))
    assert "'instruction'" in line and "data.prompt_field" in line


@pytest.mark.parametrize("path", ["/nonexistent/model", "nobody/no-such-model", "pkg://no_such_pkg_xyz/model.gguf"])
def test_unknown_model(run_cli, tmp_path, path):
    line = _tsalign_error(_fail(run_cli, tmp_path, f"policy.path={path}"))
    assert path.split("/")[-1] in line or "no_such_pkg_xyz" in line


def test_folder_that_is_not_a_model(run_cli, tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    line = _tsalign_error(_fail(run_cli, tmp_path, f"policy.path={folder}"))
    assert "config.json" in line


@pytest.mark.parametrize("override,line", [
    ("sampler.nope=1", "sampler.nope is not a key of the config (a typo? `tsalign --cfg job` prints them all)"),
    ("sampler.temperature=abc", "sampler.temperature=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("sampler=nope", "sampler=nope is not an option of sampler: one of auto, hf, vllm (conf/sampler/)"),
    ("sampler.backend=foo", "sampler.backend=foo: Invalid value 'foo', expected one of [hf, vllm, auto]"),
    ("evaluate.policy_from=sft", "evaluate.policy_from=sft: Invalid value 'sft', expected one of [dpo, pdistill]"),
    ("logger.mode=onlin", "Invalid value 'onlin', expected one of [online, offline, disabled, shared]"),
    ("data.max_prompts=[1", "no viable alternative at input '[1' (Hydra's override grammar: key=value"),
])
def test_bad_override_is_one_line(run_cli, tmp_path, override, line):
    """Hydra's own report spans 6-20 lines (the search path, the schema's classes, HYDRA_FULL_ERROR)."""
    assert line in _tsalign_error(_fail(run_cli, tmp_path, override))


def test_a_multirun_leaves_composition_to_hydra():
    from tsalign.config.overrides import composition_error
    from tsalign.config.schema import conf_dir

    assert composition_error(["-m", "seed=1,2"], str(conf_dir())) is None  # a sweep: composed per job
    assert "Ambiguous value for argument 'seed=1,2'" in composition_error(["seed=1,2"], str(conf_dir()))
    assert composition_error(["stage=plan", "--cfg", "job", "model=llama"], str(conf_dir())) is None


@pytest.mark.parametrize("override,needle", [
    ("iteration=-1", "iteration must be >= 0"),
    ("threads=0", "threads=0 must be >= 1 (null: as many as this process may use"),
    ("experiment_name=..", "experiment_name='..' must be one folder name (no '/', not '.' or '..')"),
    ("experiment_name=", "experiment_name='' must be one folder name"),
    ("experiment_name=a/b", "experiment_name='a/b' must be one folder name"),
    ("student.kind=judge", "student.kind=judge is not one of: reward_model"),
])
def test_bad_choice_is_validated(run_cli, tmp_path, override, needle):
    line = _tsalign_error(_fail(run_cli, tmp_path, override))
    assert needle in line


def test_every_bad_value_in_one_line(run_cli, tmp_path):
    line = _tsalign_error(_fail(run_cli, tmp_path, "iteration=-1", "rank.max_calls=-1", "optimizer.learning_rate=0",
                                "dpo.reference_refresh_steps=8", "dpo.lora=true"))
    assert line.startswith("tsalign: error: 4 problems in the config: (1) iteration must be >= 0; ")
    for problem in ("optimizer.learning_rate=0.0 must be > 0", "rank.max_calls=-1 must be >= 0",
                    "dpo.reference_refresh_steps=8: needs a whole number >= 1 and full fine-tuning (dpo.lora=false"):
        assert problem in line


def test_iteration_without_upstream(run_cli, tmp_path):
    line = _tsalign_error(_fail(run_cli, tmp_path, "iteration=1"))
    assert "stage=dpo" in line


def test_changed_config_needs_redo(run_cli, tmp_path):
    out = tmp_path / "outputs"
    ok = run_cli(["model=tiny", f"paths.outputs={out}", "data.max_prompts=1", "generate.num_candidates=1",
                  "sampler.max_new_tokens=2"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    manifest = out / "default" / "iter_0" / "generate" / "manifest.json"
    assert manifest.is_file()
    before = manifest.read_bytes()
    done = run_cli(["model=tiny", f"paths.outputs={out}", "data.max_prompts=1", "generate.num_candidates=1",
                    "sampler.max_new_tokens=3"], cwd=tmp_path)
    line = _tsalign_error(done)
    assert "redo=true" in line and "sampler.max_new_tokens" in line
    assert manifest.read_bytes() == before


def test_model_dir_prints_the_folder_to_serve(run_cli, tmp_path):
    """`tsalign-model-dir policy` (README: Served teacher) prints the local HF folder of the configured policy."""
    import subprocess
    import sys

    from conftest import REPO

    code = "import sys; from tsalign.cli import model_dir_main; model_dir_main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, "policy", "model=tiny"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and (folder / "config.json").is_file()
