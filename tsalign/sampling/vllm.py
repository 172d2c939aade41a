"""vLLM backend (GPU). Imported lazily: vLLM's wheel is CUDA-only and is an optional extra."""

from __future__ import annotations

import gc
from pathlib import Path

from tsalign.errors import TsalignError
from tsalign.sampling.base import Completion, SamplingParams


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise TsalignError("sampler=vllm needs vLLM: `pip install 'tsalign[vllm]'` on a CUDA machine, "
                           "or use sampler=hf") from None
    return vllm


class VLLMSampler:
    def __init__(self, model_dir: Path, dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, enforce_eager: bool = False):
        vllm = import_vllm()
        import torch

        if not torch.cuda.is_available():
            raise TsalignError("sampler=vllm needs a CUDA GPU and none is visible; use sampler=hf on CPU")
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, enforce_eager=enforce_eager,
        )
        self.stats = {"generated_tokens": 0}

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        sampling = self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
            seed=params.seed, truncate_prompt_tokens=params.max_prompt_tokens,
        )
        outputs = self.llm.chat(prompts, sampling_params=sampling, use_tqdm=True, add_generation_prompt=True)
        results = []
        for request in outputs:
            # vLLM keeps the prompt's last max_prompt_tokens tokens, as the hf sampler does
            truncated = len(request.prompt_token_ids or []) >= params.max_prompt_tokens
            results.append([
                Completion(o.text.strip(), "length" if o.finish_reason == "length" else "stop", len(o.token_ids),
                           truncated)
                for o in request.outputs
            ])
            self.stats["generated_tokens"] += sum(len(o.token_ids) for o in request.outputs)
        return results

    def close(self) -> None:
        del self.llm
        gc.collect()
