"""transformers' SDPA attention, with a grouped-query model's key/value heads handed to torch as they are.

With a padding mask (every left-padded batch of prompts) transformers copies a grouped-query model's key/value heads
up to the query heads before calling torch (repeat_kv: SmolLM2's 3 heads to 9, the whole KV cache, every layer, every
decode step), because CUDA's fast kernels take no mask with grouped heads. torch's CPU kernel takes both
(enable_gqa): the same tokens, sampled faster (32 held-out prompts, one answer each, hf on 2 cores: 47.4 -> 41.4 s;
BENCHMARKS.md "Per machine").

    use_grouped_attention(model)   # a causal LM loaded with SDPA attention, on a CPU
"""

from __future__ import annotations

import torch

NAME = "sdpa_grouped_cpu"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs):
    """transformers' sdpa_attention_forward, except for a masked grouped-query call on a CPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or query.device.type != "cpu"
             or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # with a mask transformers passes is_causal=False too: the mask holds the causal pattern
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> bool:
    """Switch a loaded model from "sdpa" to grouped_sdpa (same masks); False where it does not apply."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
