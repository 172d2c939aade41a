"""Samplers: one protocol (base.py), two backends (hf: transformers generate; vllm: imported lazily)."""

from __future__ import annotations

from pathlib import Path

from tsalign.config.choices import SamplerBackend
from tsalign.engines.sampling.base import Completion, Sampler, SamplingParams


def make_sampler(backend: str, model_dir: Path, dtype: str = "float32", device: str = "cpu", batch_size: int = 64,
                 seed: int = 0, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, enforce_eager: bool | None = None,
                 kv_cache_gib: float | None = None) -> Sampler:
    """A sampler over the HF folder `model_dir`; device and batch_size are hf's, the rest vLLM's engine
    options (None: vLLM's default for the platform; see tsalign.engines.vllm_engine)."""
    if SamplerBackend(backend) is SamplerBackend.hf:
        from tsalign.engines.sampling.hf import HFSampler

        return HFSampler(model_dir, dtype=dtype, device=device, batch_size=batch_size)
    from tsalign.engines.sampling.vllm import VLLMSampler

    return VLLMSampler(model_dir, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib)


__all__ = ["Completion", "Sampler", "SamplingParams", "make_sampler"]
