"""Samplers: one protocol, two backends (hf: transformers generate; vllm: lazy import, GPU)."""

from tsalign.sampling.base import Completion, Sampler, SamplingParams, make_sampler

__all__ = ["Completion", "Sampler", "SamplingParams", "make_sampler"]
