"""Top-p without a vocabulary sort (tsalign.engines.sampling.nucleus): transformers' distribution, exactly."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from tsalign.engines.sampling.base import SamplingParams
from tsalign.engines.sampling.nucleus import NucleusSampler, nucleus


def transformers_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What do_sample=True with temperature and top_p draws from: softmax after transformers' own warpers."""
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    return scores.softmax(dim=-1)


def nucleus_distribution(logits: torch.Tensor, top_p: float, candidates: int) -> tuple[torch.Tensor, int]:
    ids, probs, sorted_rows = nucleus(logits, top_p, candidates)
    dense = torch.zeros_like(logits).scatter_add_(-1, ids, probs)  # padding: id 0 with probability 0
    return dense / dense.sum(dim=-1, keepdim=True), sorted_rows


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.99])
def test_the_nucleus_is_transformers_top_p_with_and_without_the_full_sort(top_p):
    """Peaked rows (the nucleus among the top candidates) and flat ones (past them: the full sort), in one batch."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 3000, generator=g) * torch.tensor([0.2, 1.0, 4.0, 12.0]).repeat(3)[:, None]
    ours, sorted_rows = nucleus_distribution(logits / 0.8, top_p, candidates=32)
    assert 0 < sorted_rows < 12  # both paths taken
    reference = transformers_distribution(logits, 0.8, top_p)
    # the same tokens kept, but where float32 rounding decides (both sum the same probabilities in another order):
    # a token whose more likely tokens hold top_p of the mass to within 1e-5
    probs = (logits.double() / 0.8).softmax(dim=-1)
    mass_above = (probs[:, None, :] > probs[:, :, None]).double().mul(probs[:, None, :]).sum(dim=-1)
    differ = (ours > 0) != (reference > 0)
    assert ((mass_above - top_p).abs()[differ] < 1e-5).all()
    assert differ.sum() <= 2 and torch.allclose(ours, reference, atol=1e-3)
    same = ~differ.any(dim=-1)
    assert same.sum() >= 10 and torch.allclose(ours[same], reference[same], atol=1e-6)


def test_the_most_likely_token_is_always_kept():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    _, probs, _ = nucleus(logits, 0.01, candidates=2)
    assert (probs[:, 0] > 0).all() and (probs[:, 1:] == 0).all()


def test_the_sampler_draws_the_nucleus_distribution_and_masks_the_rest():
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -3.0, -5.0])
    draws = 40_000
    torch.manual_seed(0)
    sampler = NucleusSampler(temperature=0.8, top_p=0.9, candidates=4)
    out = sampler(None, logits.repeat(draws, 1))
    assert (torch.isfinite(out).sum(dim=-1) == 1).all()  # one token per row, -inf elsewhere: greedy takes it
    counts = torch.bincount(out.argmax(dim=-1), minlength=len(logits)).float() / draws
    expected = transformers_distribution(logits[None], 0.8, 0.9)[0]
    assert torch.equal(counts > 0, expected > 0)
    assert (counts - expected).abs().max() < 0.01  # ~5 standard errors at 40k draws
    assert sampler.rows == draws


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_draws_from_one_generator_per_row_follow_the_distribution(top_p):
    logits = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -3.0, -5.0])
    draws = 20_000
    generators = [torch.Generator().manual_seed(s) for s in range(draws)]
    out = NucleusSampler(0.8, top_p, candidates=4, generators=generators)(None, logits.repeat(draws, 1))
    counts = torch.bincount(out.argmax(dim=-1), minlength=len(logits)).float() / draws
    expected = transformers_distribution(logits[None], 0.8, top_p)[0] if top_p < 1 else (logits / 0.8).softmax(-1)
    if top_p < 1:
        assert torch.equal(counts > 0, expected > 0)  # the tail past the nucleus never drawn
    assert (counts - expected).abs().max() < 0.015  # ~5 standard errors at 20k draws
    again = NucleusSampler(0.8, top_p, candidates=4, generators=[torch.Generator().manual_seed(s) for s in range(9)])
    first = NucleusSampler(0.8, top_p, candidates=4, generators=[torch.Generator().manual_seed(s) for s in range(9)])
    assert torch.equal(first(None, logits.repeat(9, 1)), again(None, logits.repeat(9, 1)))
    with pytest.raises(ValueError, match="9 generators for 2 rows"):
        NucleusSampler(0.8, top_p, generators=generators[:9])(None, logits.repeat(2, 1))


def test_the_same_seed_gives_the_same_draws_and_top_p_1_samples_the_whole_vocabulary():
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    first = NucleusSampler(1.0, 0.95)(None, logits).argmax(dim=-1)
    torch.manual_seed(7)
    assert torch.equal(first, NucleusSampler(1.0, 0.95)(None, logits).argmax(dim=-1))
    torch.manual_seed(7)
    whole = NucleusSampler(1.0, 1.0)(None, logits.repeat(50, 1)).argmax(dim=-1)
    assert len(set(whole.tolist())) > 300  # tokens from the tail too
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NucleusSampler(0.0, 0.9)


def test_hf_sampling_is_seeded_and_varies_within_a_group(compose):
    """The hf sampler draws through NucleusSampler: K different answers per prompt, the same for the same seed."""
    from tsalign.engines.sampling.hf import HFSampler
    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny"])
    sampler = HFSampler(base_model_dir(cfg, cfg.policy), batch_size=8)
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Count to three."}]]
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=3)
    first = sampler.generate(prompts, params)
    assert first == sampler.generate(prompts, params)
    assert first != sampler.generate(prompts, SamplingParams(**{**params.as_dict(), "seed": 4}))
    assert all(len(group) == 4 and len({c.text for c in group}) > 1 for group in first)
    rows = sampler.stats["drawn_rows"]  # three calls of 8 sequences, up to 8 steps each
    assert 0 < rows <= 3 * 8 * 8 and rows % 8 == 0
    sampler.close()
