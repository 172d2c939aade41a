"""The script you would write yourself, one library call per step: the baselines benchmarks/bench.py times
tsalign's stages against, on identical inputs (the same prompts, candidates, pairs and settings).

    python benchmarks/plain_baseline.py generate  --model DIR --prompts P.json --k 4 --max-new-tokens 128
    python benchmarks/plain_baseline.py generate-vllm --model DIR --prompts P.json --k 4 --max-new-tokens 128
    python benchmarks/plain_baseline.py score     --model RM_DIR --candidates candidates.jsonl
    python benchmarks/plain_baseline.py dpo       --model DIR --pairs pairs.jsonl --max-length 384 --steps 8
    python benchmarks/plain_baseline.py evaluate  --policy DIR --base DIR --judge RM_DIR --prompts P.json
    python benchmarks/plain_baseline.py score-order --model RM_DIR --candidates candidates.jsonl [--judge DIR]
    python benchmarks/plain_baseline.py judge-once --judge DIR --candidates candidates.jsonl --variant fixed

generate: transformers `model.generate` over batches in arrival order (chat template, left padding,
num_return_sequences=K). generate-vllm: a bare `vllm.LLM(...).generate`, with the engine options tsalign
uses on CPU. score: a reward model scores every candidate (arrival-order batches), best vs worst is the
pair. dpo: TRL's DPOTrainer called directly on a pairs file (use_cpu=True, bf16=False,
gradient_checkpointing=False, no checkpoints). evaluate: the policy and the base answer each prompt
once, the reward model judges each pair. score-order is not a baseline: tsalign's own RewardModelScorer
(and, with --judge, its JudgeScorer) called directly, with length-sorted batches vs arrival order (and the
judge as it was before its fix vs as it is: sorted, LM head on the last position only); judge-once runs one
of those judge variants alone in a process, for its peak memory.

Prompts files are JSON lists of {"prompt_id", "messages"}. Each command prints `RESULT {json}` last:
its timings (load_s, the timed work, tokens) for bench.py to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- generate: transformers


def load_lm(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet()
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def hf_generate(tok, model, prompts: list[list[dict]], k: int, max_new_tokens: int, batch_size: int,
                temperature: float, top_p: float, seed: int) -> tuple[list[list[str]], int, float]:
    """(K texts per prompt, tokens generated up to the first EOS, seconds in model.generate)."""
    import torch

    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    per_call = max(1, batch_size // k)
    texts, tokens, seconds = [], 0, 0.0
    torch.manual_seed(seed)
    for start in range(0, len(prompts), per_call):
        chat = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for m in prompts[start : start + per_call]]
        batch = tok(chat, return_tensors="pt", padding=True, add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=temperature > 0, temperature=temperature or None,
                                 top_p=top_p if temperature > 0 else None, top_k=None,
                                 max_new_tokens=max_new_tokens, num_return_sequences=k,
                                 pad_token_id=tok.pad_token_id)
        seconds += time.perf_counter() - t0
        for j, row in enumerate(out[:, batch["input_ids"].shape[1] :].tolist()):
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            tokens += end
            if j % k == 0:
                texts.append([])
            texts[-1].append(tok.decode(row[:end], skip_special_tokens=True).strip())
    return texts, tokens, seconds


def cmd_generate(a) -> None:
    prompts = json.loads(Path(a.prompts).read_text())
    t0 = time.perf_counter()
    tok, model = load_lm(a.model)
    load_s = time.perf_counter() - t0
    texts, tokens, seconds = hf_generate(tok, model, [p["messages"] for p in prompts], a.k, a.max_new_tokens,
                                         a.batch_size, a.temperature, a.top_p, a.seed)
    t0 = time.perf_counter()
    del model
    close_s = time.perf_counter() - t0
    if a.out:
        Path(a.out).write_text("".join(json.dumps({"prompt_id": p["prompt_id"], "prompt": p["messages"],
                                                   "candidates": [{"text": t} for t in ts]}) + "\n"
                                       for p, ts in zip(prompts, texts)))
    emit({"load_s": load_s, "sample_s": seconds, "close_s": close_s, "generated_tokens": tokens,
          "tokens_per_s": tokens / seconds, "prompts": len(prompts), "k": a.k})


# ---------------------------------------------------------------- generate: vLLM


def cmd_generate_vllm(a) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    prompts = json.loads(Path(a.prompts).read_text())
    cpu = current_platform.is_cpu()
    options = {"kv_cache_memory_bytes": 2 * 2**30} if cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") else {}
    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype=a.dtype, seed=a.seed, enforce_eager=cpu, **options)
    load_s = time.perf_counter() - t0
    params = SamplingParams(n=a.k, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_new_tokens, seed=a.seed)
    t0 = time.perf_counter()
    outputs = llm.chat([p["messages"] for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    eos = llm.get_tokenizer().eos_token_id
    tokens = sum(len(o.token_ids) - (o.finish_reason == "stop" and bool(o.token_ids) and o.token_ids[-1] == eos)
                 for r in outputs for o in r.outputs)
    t0 = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()  # what tsalign's stop_engine does
    close_s = time.perf_counter() - t0
    emit({"load_s": load_s, "sample_s": seconds, "close_s": close_s, "generated_tokens": tokens,
          "tokens_per_s": tokens / seconds, "prompts": len(prompts), "k": a.k})


# ---------------------------------------------------------------- reward model scoring


def load_rm(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32).eval()
    return tok, model


def prompt_text(messages: list[dict]) -> str:
    return messages[-1]["content"] if len(messages) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def rm_scores(tok, model, prompts: list[str], responses: list[str], max_length: int, batch_size: int) -> list[float]:
    """(prompt, response) pairs through the reward model in arrival-order batches."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            batch = tok(prompts[s : s + batch_size], responses[s : s + batch_size], truncation="only_first",
                        max_length=max_length, padding=True, return_tensors="pt")
            out += model(**batch).logits[:, 0].float().tolist()
    return out


def cmd_score(a) -> None:
    rows = read_jsonl(Path(a.candidates))
    t0 = time.perf_counter()
    tok, model = load_rm(a.model)
    load_s = time.perf_counter() - t0
    flat_p = [prompt_text(r["prompt"]) for r in rows for _ in r["candidates"]]
    flat_r = [c["text"] for r in rows for c in r["candidates"]]
    t0 = time.perf_counter()
    scores = rm_scores(tok, model, flat_p, flat_r, a.max_length, a.batch_size)
    seconds = time.perf_counter() - t0
    pairs, n = 0, 0
    for r in rows:
        s = scores[n : n + len(r["candidates"])]
        n += len(r["candidates"])
        pairs += max(s) > min(s)
    emit({"load_s": load_s, "score_s": seconds, "calls": len(flat_r), "pairs": pairs})


# ---------------------------------------------------------------- DPO


def cmd_dpo(a) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    quiet()
    rows = [{k: [{"role": m["role"], "content": m["content"]} for m in p[k]] for k in ("prompt", "chosen", "rejected")}
            for p in read_jsonl(Path(a.pairs))]
    out = Path(a.out or tempfile.mkdtemp(prefix="plain-dpo-"))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    args = DPOConfig(output_dir=str(out / "trainer"), beta=a.beta, max_length=a.max_length, max_steps=a.steps,
                     per_device_train_batch_size=a.batch_size, learning_rate=a.learning_rate,
                     lr_scheduler_type="linear", optim="adamw_torch", logging_steps=1, seed=a.seed,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.model.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    save_s = time.perf_counter() - t0
    steps = trainer.state.global_step
    emit({"load_s": load_s, "train_s": train_s, "steps": steps, "s_per_step": train_s / max(steps, 1),
          "save_s": save_s, "pairs": len(rows), "trained_pairs": len(trainer.train_dataset)})


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(a) -> None:
    prompts = json.loads(Path(a.prompts).read_text())
    messages = [p["messages"] for p in prompts]
    answers, load_s, sample_s, tokens = {}, 0.0, 0.0, 0
    for name, model_dir, seed in (("policy", a.policy, a.seed + 1), ("base", a.base, a.seed)):
        t0 = time.perf_counter()
        tok, model = load_lm(model_dir)
        load_s += time.perf_counter() - t0
        texts, n, seconds = hf_generate(tok, model, messages, 1, a.max_new_tokens, a.batch_size, a.temperature,
                                        a.top_p, seed)
        answers[name], sample_s, tokens = [t[0] for t in texts], sample_s + seconds, tokens + n
        del model
    t0 = time.perf_counter()
    tok, model = load_rm(a.judge)
    load_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    text = [prompt_text(m) for m in messages]
    policy = rm_scores(tok, model, text, answers["policy"], a.max_length, a.judge_batch_size)
    base = rm_scores(tok, model, text, answers["base"], a.max_length, a.judge_batch_size)
    judge_s = time.perf_counter() - t0
    wins = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, base)]
    emit({"load_s": load_s, "sample_s": sample_s, "generated_tokens": tokens, "judge_s": judge_s,
          "n": len(prompts), "win_rate": statistics.fmean(wins)})


# ---------------------------------------------------------------- length-sorted vs arrival-order batches


def cmd_score_order(a) -> None:
    """tsalign's RewardModelScorer called directly: score_texts length-sorts its input before batching,
    so one call per arrival-order batch is the unsorted case. Real tokens per second either way (the
    padding is the difference). With --judge, the same for the pairwise judge (JudgeScorer batches in
    arrival order; the sorted case renders and sorts the items first, as a fix would)."""
    from tsalign.engines.scoring import make_scorer
    from tsalign.engines.scoring.reward_model import encode_pair_text

    rows = read_jsonl(Path(a.candidates))
    prompts = [r["prompt"] for r in rows for _ in r["candidates"]]
    responses = [c["text"] for r in rows for c in r["candidates"]]
    scorer = make_scorer("reward_model", Path(a.model), max_length=a.max_length, batch_size=a.batch_size, seed=1)
    t0 = time.perf_counter()
    lengths = [len(encode_pair_text(scorer.tokenizer, p, r, a.max_length)[0]["input_ids"])
               for p, r in zip(prompts, responses)]
    encode_s = time.perf_counter() - t0  # the tokenizer's share of a score_texts call
    bs = a.batch_size

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[s : s + bs]) * len(order[s : s + bs]) for s in range(0, len(order), bs))

    def sorted_run() -> float:
        t0 = time.perf_counter()
        scorer.score_texts(prompts, responses)
        return time.perf_counter() - t0

    def arrival_run() -> float:
        t0 = time.perf_counter()
        for s in range(0, len(prompts), bs):
            scorer.score_texts(prompts[s : s + bs], responses[s : s + bs])
        return time.perf_counter() - t0

    sorted_run()  # warm-up (first batches allocate)
    times = {"sorted": [], "arrival": []}
    for r in range(a.repeats):  # alternating, the order flipped every repeat
        for name in (("sorted", "arrival") if r % 2 == 0 else ("arrival", "sorted")):
            times[name].append(sorted_run() if name == "sorted" else arrival_run())
    real = sum(lengths)
    result = {"responses": len(responses), "real_tokens": real, "batch_size": bs, "encode_s": encode_s,
              "padded_tokens": {"sorted": padded(sorted(range(len(lengths)), key=lengths.__getitem__)),
                                "arrival": padded(list(range(len(lengths))))},
              "seconds": times, "tokens_per_s": {k: real / statistics.median(v) for k, v in times.items()}}
    scorer.close()
    if a.judge:
        result["judge"] = judge_order(a, rows)
    emit(result)


def load_judge(a, rows: list[dict]):
    """tsalign's JudgeScorer as teacher=smollm2_judge configures it, and the first --judge-items
    candidate pairs of the rows as (prompt, first, second) items."""
    import itertools

    from omegaconf import OmegaConf

    from tsalign.engines.scoring import make_scorer

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "teacher" / "smollm2_judge.yaml")
    judge = make_scorer("judge", Path(a.judge), batch_size=conf.batch_size, max_length=conf.max_length,
                        judge_prompt=conf.judge_prompt, judge_choices=tuple(conf.judge_choices))
    items = [(r["prompt"], x["text"], y["text"]) for r in rows for x, y in itertools.combinations(r["candidates"], 2)]
    return judge, items[: a.judge_items]


def judge_variants(judge, items: list) -> dict:
    """name -> () -> (seconds, P(first) per item): the judge as it was before the fourth session's fix
    (batches in arrival order, the LM head's logits at every position: "arrival"), the same on the items
    sorted by rendered length ("sorted"), and tsalign's JudgeScorer._first_probs as it is now ("fixed":
    rendered once, length-sorted, logits_to_keep=1, so only batch x 1 x vocab logits)."""
    import torch

    def full_logits(length_sorted: bool) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        rendered = [judge._render(*it) for it in items]
        order = sorted(range(len(items)), key=lambda i: len(rendered[i])) if length_sorted else range(len(items))
        order, out = list(order), [0.0] * len(items)
        with torch.no_grad():
            for s in range(0, len(order), judge.batch_size):
                idx = order[s : s + judge.batch_size]
                batch = judge.tokenizer.pad([{"input_ids": rendered[i]} for i in idx], return_tensors="pt")
                logits = judge.model(**batch).logits[:, -1, judge.choice_ids].float()
                for i, p in zip(idx, torch.softmax(logits, dim=-1)[:, 0].tolist()):
                    out[i] = p
        return time.perf_counter() - t0, out

    def fixed() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        out = judge._first_probs(items)
        return time.perf_counter() - t0, out

    return {"arrival": lambda: full_logits(False), "sorted": lambda: full_logits(True), "fixed": fixed}


def judge_order(a, rows: list[dict]) -> dict:
    judge, items = load_judge(a, rows)
    lengths = [len(judge._render(*it)) for it in items]
    order = sorted(range(len(items)), key=lengths.__getitem__)
    variants = judge_variants(judge, items)
    variants["arrival"]()  # warm-up: the first forward passes allocate
    times = {k: [] for k in variants}
    outputs = {}
    for r in range(a.repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            seconds, outputs[name] = variants[name]()
            times[name].append(seconds)
    judge.close()
    bs = judge.batch_size

    def padded(idx: list[int]) -> int:
        return sum(max(lengths[i] for i in idx[s : s + bs]) * len(idx[s : s + bs]) for s in range(0, len(idx), bs))

    return {"items": len(items), "real_tokens": sum(lengths), "batch_size": bs,
            "padded_tokens": {"sorted": padded(order), "arrival": padded(list(range(len(items))))},
            "max_abs_diff": {k: max(abs(x - y) for x, y in zip(outputs[k], outputs["arrival"])) for k in ("sorted", "fixed")},
            "seconds": times, "tokens_per_s": {k: sum(lengths) / statistics.median(v) for k, v in times.items()}}


def cmd_judge_once(a) -> None:
    """One judge variant once, alone in its process: the bench reads this process's peak memory."""
    judge, items = load_judge(a, read_jsonl(Path(a.candidates)))
    seconds, _ = judge_variants(judge, items)[a.variant]()
    emit({"variant": a.variant, "items": len(items), "seconds": seconds})


# ---------------------------------------------------------------- CLI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def sampling(p):
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.8)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--batch-size", type=int, default=16, help="sequences per generate() call")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out")
    sampling(p)
    p = sub.add_parser("generate-vllm")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    sampling(p)
    p = sub.add_parser("score")
    p.add_argument("--model", required=True)
    p.add_argument("--candidates", required=True)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p = sub.add_parser("dpo")
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out")
    p = sub.add_parser("evaluate")
    p.add_argument("--policy", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--judge", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--judge-batch-size", type=int, default=32)
    sampling(p)
    p = sub.add_parser("score-order")
    p.add_argument("--model", required=True)
    p.add_argument("--candidates", required=True)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--judge", help="also time the pairwise judge (a causal LM folder) sorted vs arrival order")
    p.add_argument("--judge-items", type=int, default=48)
    p = sub.add_parser("judge-once")
    p.add_argument("--judge", required=True, help="the judge model folder (a causal LM)")
    p.add_argument("--candidates", required=True)
    p.add_argument("--judge-items", type=int, default=48)
    p.add_argument("--variant", choices=("arrival", "sorted", "fixed"), required=True)
    a = ap.parse_args()
    {"judge-once": cmd_judge_once, "generate": cmd_generate, "generate-vllm": cmd_generate_vllm, "score": cmd_score, "dpo": cmd_dpo,
     "evaluate": cmd_evaluate, "score-order": cmd_score_order}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
