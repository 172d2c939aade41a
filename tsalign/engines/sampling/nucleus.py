"""Temperature + top-p (nucleus) sampling for transformers' generate, without sorting the vocabulary.

transformers' TopPLogitsWarper sorts all 49k logits of every sequence at every step, and its multinomial draws an
exponential variate per vocabulary entry: 24 ms + 14 ms of a ~140 ms decode step at batch 16 on a 2-core CPU
(torch profiler, SmolLM2-135M). The nucleus is almost always among the few hundred most likely tokens, so it is
found among the top `candidates` (torch.topk), with the full sort kept for any row whose top candidates hold less
than top_p of the mass: the kept set is top-p's (to float rounding at its edge). The token is drawn among the kept
ones only.

hf.py uses it as the last logits processor of a greedy generate (do_sample=False): it draws the token and returns
scores that are -inf everywhere else, so greedy's argmax takes the drawn token. Same distribution as
do_sample=True with temperature and top_p; another random stream (the draws are over the nucleus, not the vocabulary).
"""

from __future__ import annotations

import torch


def nucleus(logits: torch.Tensor, top_p: float, candidates: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(token ids, probabilities, rows sorted in full): per row, most likely first, the smallest set of tokens
    whose probability mass reaches top_p (transformers' rule: a token is kept while the mass of the tokens more
    likely than it is below top_p; the most likely token always). Rows are padded to a common width with token 0 at
    probability 0 (scatter with add, not assignment); the count says how many rows needed the full sort."""
    logits = logits.float()
    width = min(candidates, logits.shape[-1])
    top, ids = logits.topk(width, dim=-1)  # sorted, most likely first
    probs = (top - logits.logsumexp(dim=-1, keepdim=True)).exp()
    above = probs.cumsum(dim=-1) - probs  # the mass of the tokens more likely than each one
    short = (above[:, -1] + probs[:, -1]) < top_p  # rows whose nucleus reaches past the top candidates
    sorted_rows = int(short.sum())
    if sorted_rows:  # the full sort, for those rows only
        full_logits, full_ids = logits[short].sort(dim=-1, descending=True)
        full_probs = full_logits.softmax(dim=-1)
        full_above = full_probs.cumsum(dim=-1) - full_probs
        wide = int((full_above < top_p).sum(dim=-1).max())  # > width: a short row keeps more than its top width
        pad = (0, wide - width)
        ids, probs = torch.nn.functional.pad(ids, pad), torch.nn.functional.pad(probs, pad)
        above = torch.nn.functional.pad(above, pad, value=float("inf"))
        ids[short], probs[short], above[short] = full_ids[:, :wide], full_probs[:, :wide], full_above[:, :wide]
    keep = above < top_p
    keep[:, 0] = True
    return ids, torch.where(keep, probs, torch.zeros_like(probs)), sorted_rows


class NucleusSampler:
    """A logits processor that samples: temperature, then top-p, then one draw per row, from that row's own generator
    where `generators` are given (one per row, in batch order: what a row draws does not depend on the rows beside
    it), else from the global torch generator (seeded by the caller). Returns -inf everywhere but the drawn token."""

    def __init__(self, temperature: float, top_p: float, candidates: int = 256,
                 generators: list[torch.Generator] | None = None):
        if temperature <= 0:
            raise ValueError("NucleusSampler samples: temperature must be > 0 (greedy decoding needs no processor)")
        self.temperature, self.top_p, self.candidates, self.generators = temperature, top_p, candidates, generators
        self.rows, self.sorted_rows = 0, 0  # rows drawn, and how many of them needed the full sort

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scaled = scores.float() / self.temperature
        if self.top_p >= 1.0:  # no nucleus: the whole vocabulary
            drawn = self._draw(scaled.softmax(dim=-1))
        else:
            ids, probs, sorted_rows = nucleus(scaled, self.top_p, self.candidates)
            drawn = ids.gather(-1, self._draw(probs))
            self.sorted_rows += sorted_rows
        self.rows += scores.shape[0]
        return torch.full_like(scores, float("-inf")).scatter_(-1, drawn, 0.0)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row, with probability proportional to `probs` (rows need not sum to 1; zeros never drawn)."""
        if self.generators is None:
            return torch.multinomial(probs, 1)
        if len(self.generators) != probs.shape[0]:
            raise ValueError(f"NucleusSampler: {len(self.generators)} generators for {probs.shape[0]} rows")
        uniform = torch.stack([torch.rand((), generator=g, device=g.device, dtype=torch.float64)
                               for g in self.generators]).to(probs.device)
        cdf = probs.double().cumsum(dim=-1)
        # the first index whose cumulative mass exceeds u * total: a zero-probability entry adds no mass, so never
        picked = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True)
        return picked.clamp(max=probs.shape[-1] - 1)
