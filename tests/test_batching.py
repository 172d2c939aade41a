"""Which prompts share a transformers generate call (engines/sampling/batching.py), and the prompt cache that
prefills each prompt once for its K samples (engines/sampling/hf.py)."""

from __future__ import annotations

import itertools
import random

import pytest

from tsalign.engines.sampling import SamplingParams
from tsalign.engines.sampling.batching import CallCost, length_batches

# SmolLM2-135M in float32: 134.5M parameters, 30 layers x 2 x 3 key/value heads x 64 dims
SMOLLM2 = CallCost.of(134_515_008, 4, 30 * 2 * 3 * 64 * 4)


def total(lengths, batches, n, max_new, cost=SMOLLM2):
    return sum(cost.seconds(len(b), len(b) * n, max(lengths[i] for i in b), max_new) for b in batches)


def test_the_rates_give_the_measured_step_times():
    """The Xeon's decode steps (module docstring): 4 rows at 128 cached positions 54.7 ms, 64 rows at 512 372 ms."""
    def step(rows, cached):
        return SMOLLM2.step_s + rows * (SMOLLM2.token_s + SMOLLM2.position_s * cached)

    assert step(4, 128) == pytest.approx(0.0547, rel=0.1)
    assert step(64, 512) == pytest.approx(0.372, rel=0.1)


def test_prompts_of_one_length_fill_calls_up_to_max_rows():
    assert length_batches([50] * 16, 4, 64, 128, SMOLLM2) == [list(range(16))]
    batches = length_batches([50] * 20, 4, 64, 128, SMOLLM2)  # 80 sequences: two calls, none over 64
    assert len(batches) == 2 and max(len(b) * 4 for b in batches) <= 64


def test_a_long_prompt_gets_its_own_call_and_short_ones_stay_together():
    lengths = [40, 45, 2000, 50, 38] + [42] * 10
    batches = length_batches(lengths, 4, 64, 128, SMOLLM2)
    assert [2] in batches
    assert total(lengths, batches, 4, 128) < total(lengths, [list(range(15))], 4, 128)


def test_every_prompt_once_shortest_first_and_at_least_one_per_call():
    lengths = [300, 12, 80, 80, 7, 1000, 64]
    batches = length_batches(lengths, 16, 8, 64, SMOLLM2)  # n > max_rows: one prompt per call
    assert batches == [[i] for i in sorted(range(7), key=lengths.__getitem__)]
    batches = length_batches(lengths, 2, 64, 64, SMOLLM2)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(7)) and [lengths[i] for i in flat] == sorted(lengths)
    assert length_batches([], 4, 64, 128, SMOLLM2) == []


@pytest.mark.parametrize("seed", range(20))
def test_the_split_is_the_cheapest_of_all_contiguous_splits(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(10, 120), rng.randint(200, 900)]) for _ in range(rng.randint(1, 9))]
    n, max_rows, max_new = rng.choice([1, 2, 4]), rng.choice([4, 8, 64]), rng.choice([16, 128])
    cost = CallCost(rng.uniform(0.01, 0.1), rng.uniform(1e-4, 2e-3), rng.uniform(1e-6, 2e-5))
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min(
        total(lengths, parts, n, max_new, cost)
        for cuts in itertools.product([False, True], repeat=len(order) - 1)
        for parts in [split(order, cuts)]
        if all(len(p) * n <= max(max_rows, n) for p in parts)
    )
    got = length_batches(lengths, n, max_rows, max_new, cost)
    assert total(lengths, got, n, max_new, cost) == pytest.approx(best)


def split(order, cuts):
    parts, current = [], [order[0]]
    for i, cut in zip(order[1:], cuts):
        if cut:
            parts.append(current)
            current = []
        current.append(i)
    return parts + [current]


# float32 matmuls round with the call's row count (MKL's blocking: seen on an AMD EPYC, not on a Xeon), and a draw
# within ~1e-7 of a token's boundary in the tiny model's flat distribution then picks its neighbour; in float64 the
# tests below compare the random streams, which is what batching must not change
EXACT = "float64"


@pytest.fixture(scope="module")
def sampler(compose):
    import torch

    from tsalign.engines.sampling.hf import HFSampler
    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny"])
    s = HFSampler(base_model_dir(cfg, cfg.policy), batch_size=64)
    g = torch.Generator().manual_seed(0)  # larger random weights: the output depends on the prompt
    with torch.no_grad():
        for p in s.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    s.model.to(getattr(torch, EXACT))
    yield s
    s.close()


PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about castles. " * 6}],
           [{"role": "user", "content": "Count to three."}]]


def test_the_prompt_cache_gives_the_logits_of_k_full_prefills(sampler):
    """Each prompt prefilled once and its keys/values repeated K times: the first answer token's logits are those of
    K left-padded copies prefilled whole, with the same positions."""
    import torch

    from tsalign.engines.sampling.base import chat_prompt_ids

    k = 3
    ids = [chat_prompt_ids(sampler.tokenizer, m, 512)[0] for m in PROMPTS]
    batch = sampler.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    cache = sampler._prompt_cache(batch, k)
    assert cache.get_seq_length() == batch["input_ids"].shape[1] - 1
    full = {key: v.repeat_interleave(k, dim=0) for key, v in batch.items()}
    positions = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = sampler.model(**full, position_ids=positions).logits[:, -1]
        forked = sampler.model(input_ids=full["input_ids"][:, -1:], attention_mask=full["attention_mask"],
                               position_ids=positions[:, -1:], past_key_values=cache).logits[:, -1]
    assert torch.allclose(whole, forked, atol=1e-4), (whole - forked).abs().max()
    assert sampler._prompt_cache(batch, 1) is None  # one sample: generate prefills as usual


def test_sampling_through_the_prompt_cache_draws_what_full_prefills_draw(sampler, monkeypatch):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=10, seed=5)
    forked = sampler.generate(PROMPTS, params)
    monkeypatch.setattr(sampler, "_prompt_cache", lambda batch, n: None)  # transformers prefills every copy
    whole = sampler.generate(PROMPTS, params)
    assert [[c.text for c in g] for g in forked] == [[c.text for c in g] for g in whole]
    assert all(len({c.text for c in g}) > 1 for g in forked)


def test_a_prompts_samples_do_not_depend_on_the_prompts_beside_it(sampler):
    """Each sample draws from its own seeded generator (hf.row_seed, as vLLM seeds its requests): one call or
    several, alone or with others, the same answers; chunks sampled together are the chunks sampled apart."""
    from tsalign.engines.sampling.hf import HFSampler

    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=11)
    together = sampler.generate(PROMPTS, params)
    narrow = HFSampler.__new__(HFSampler)
    narrow.__dict__.update(sampler.__dict__, batch_size=3)  # one prompt per call
    assert narrow.generate(PROMPTS, params) == together
    other = SamplingParams(**{**params.as_dict(), "seed": 12})
    assert sampler.generate_chunks([(PROMPTS, params), (PROMPTS[:2], other)]) == [
        together, sampler.generate(PROMPTS[:2], other)]
    assert sampler.generate(PROMPTS[:2], other) != together[:2]
    with pytest.raises(ValueError, match="differ in their seed only"):
        sampler.generate_chunks([(PROMPTS, params), (PROMPTS, SamplingParams(**{**params.as_dict(), "top_p": 0.5}))])


def test_evaluate_samples_pi_0_and_its_control_in_one_pass_with_the_answers_of_two(compose, tmp_path, monkeypatch):
    """evaluate's pi_0 answers (seed s) and the control's (seed s+1) share the sampler's calls, and are the answers
    each run gets alone: the control stays matched with pi_{t+1}'s answers (also seed s+1)."""
    import torch

    from tsalign.engines.sampling import hf
    from tsalign.engines.sampling.hf import HFSampler
    from tsalign.stages import evaluate
    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny", f"paths.outputs={tmp_path}", "sampler.max_new_tokens=6"])
    model = base_model_dir(cfg, cfg.policy)
    prompts = [{"prompt_id": f"p{i}", "messages": m} for i, m in enumerate(PROMPTS * 3)]
    load = hf.load_causal_lm
    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: load(*a, **k).to(getattr(torch, EXACT)))
    calls = []
    real = HFSampler.generate_chunks
    monkeypatch.setattr(HFSampler, "generate_chunks", lambda self, chunks: calls.append(len(chunks)) or real(self, chunks))
    together = evaluate.answers(cfg, model, prompts, [(5, tmp_path / "a.jsonl"), (6, tmp_path / "b.jsonl")])
    assert calls == [2, 2]  # per chunk of prompts (model=tiny: 8), one call with both runs
    apart = [evaluate.answers(cfg, model, prompts, [(5, tmp_path / "c.jsonl")])[0],
             evaluate.answers(cfg, model, prompts, [(6, tmp_path / "d.jsonl")])[0]]
    assert together == apart and together[0] != together[1]
    calls.clear()
    assert evaluate.answers(cfg, model, prompts, [(5, tmp_path / "a.jsonl"), (6, tmp_path / "b.jsonl")]) == together
    assert calls == []  # both kept: nothing sampled, no model loaded
