"""Which prompts share one transformers generate call, by the call's expected time.

Every row of a call is padded to the call's longest prompt, and every decode step reads (and transformers' growing
cache copies) every row's keys and values: one long prompt in a wide call makes every row pay for its length, while
narrow calls pay the per-step weight reads more often. Measured on a 2-core Xeon (SmolLM2-135M, float32; decode
steps of 4-64 rows at 128-512 cached positions) a step took 47 ms + 1.05 ms per row + 0.0075 ms per row and cached
position, and a prompt token's prefill ~1.07 ms: CallCost.of scales those rates by the model's size, and
length_batches splits the prompts, shortest first, where the sum of the calls' times is least (32 held-out prompts:
33.5 -> 26 s against one call; BENCHMARKS.md "Per machine").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the Xeon's effective rates behind the figures above (per second): weights read per step, matrix-multiply flops
# (2 x parameters per token), key/value cache bytes passed per step (attention's read and the cache's copy)
WEIGHT_BYTES_PER_S = 11.5e9
FLOPS_PER_S = 2.6e11
CACHE_BYTES_PER_S = 6.1e9


@dataclass(frozen=True)
class CallCost:
    step_s: float  # per decode step: the weights read once
    token_s: float  # per row per decode step, and per prompt position prefilled
    position_s: float  # per row and cached position per decode step

    @classmethod
    def of(cls, parameters: int, bytes_per_parameter: int, cache_bytes_per_position: int) -> CallCost:
        return cls(parameters * bytes_per_parameter / WEIGHT_BYTES_PER_S, 2 * parameters / FLOPS_PER_S,
                   cache_bytes_per_position / CACHE_BYTES_PER_S)

    def seconds(self, prompts: int, rows: int, longest: int, max_new_tokens: int) -> float:
        """One call: each prompt prefilled once to the longest's length, rows decoding max_new_tokens steps (the
        cache grows from `longest` to longest + max_new_tokens)."""
        per_step = self.step_s + rows * (self.token_s + self.position_s * (longest + max_new_tokens / 2))
        return max_new_tokens * per_step + prompts * longest * self.token_s


def length_batches(lengths: list[int], n: int, max_rows: int, max_new_tokens: int, cost: CallCost) -> list[list[int]]:
    """Prompt indices per call (n sequences each, at most max_rows sequences, at least one prompt), shortest prompts
    first, split where the calls' summed time is least."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    most = max(1, max_rows // n)  # prompts per call
    best, start_of = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # best[end]: the least time for the `end` shortest prompts
        for start in range(max(0, end - most), end):
            prompts = end - start
            total = best[start] + cost.seconds(prompts, prompts * n, lengths[order[end - 1]], max_new_tokens)
            if total < best[end]:
                best[end], start_of[end] = total, start
    batches, end = [], len(order)
    while end:
        batches.append(order[start_of[end] : end])
        end = start_of[end]
    return batches[::-1]
