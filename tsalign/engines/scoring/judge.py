"""LLM-judge scorer: a generative model asked which of two responses is better.

The verdict is read from the next-token log-probabilities of the two choice tokens (e.g. "A"/"B"),
asked in both orders so position bias cancels: P(a > b) = (P(A | a first) + P(B | b first)) / 2.
A group of m candidates is scored round-robin: score_i = mean_j P(i > j); 0.5 everywhere is a tie.
`stats["first_position_rate"]` is how often a single-order verdict picked the first slot: far from
0.5 means the judge answers by position and should not be trusted.
"""

from __future__ import annotations

import itertools
import math
import string
import time
from pathlib import Path

import torch

from tsalign.engines.models import load_causal_lm, load_tokenizer
from tsalign.engines.scoring.reward_model import render_prompt
from tsalign.errors import TsalignError


def combine_orders(p_first_ab: float, p_first_ba: float) -> float:
    """P(a better than b) from the judge's P(first slot wins) with a first, then with b first."""
    return (p_first_ab + (1.0 - p_first_ba)) / 2.0


def round_robin(n: int, prefer: dict[tuple[int, int], float]) -> list[float]:
    """Scores from pairwise P(i > j) for i < j: the mean probability of beating each other candidate."""
    if n == 1:
        return [0.5]
    wins = [0.0] * n
    for (i, j), p in prefer.items():
        wins[i] += p
        wins[j] += 1.0 - p
    return [w / (n - 1) for w in wins]


def check_template(template: str) -> None:
    """A judge prompt must name exactly {prompt}, {response_a}, {response_b} (literal braces doubled)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise TsalignError(f"teacher.judge_prompt is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    if fields != {"prompt", "response_a", "response_b"}:
        raise TsalignError(f"teacher.judge_prompt must use {{prompt}}, {{response_a}} and {{response_b}}, found "
                           f"{sorted(fields)}")


class PairwiseJudge:
    """What every judge backend shares: the prompt template, clipping, both orders, round-robin
    scores, bookkeeping. A backend implements `_first_probs` (P(first slot wins) per item) and `close`."""

    def __init__(self, model_dir: Path, batch_size: int, max_length: int, template: str, choices: tuple[str, str]):
        check_template(template)
        self.tokenizer = load_tokenizer(model_dir, padding_side="left", chat=True)
        self.batch_size, self.max_length, self.template = batch_size, max_length, template
        self.choice_ids = self._choice_ids(choices)
        self.stats = {"calls": 0, "truncated": 0, "seconds": 0.0, "first_position_picks": 0}

    def _choice_ids(self, choices: tuple[str, str]) -> list[int]:
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(not i for i in ids) or ids[0][0] == ids[1][0]:
            raise TsalignError(f"judge choices {choices} must start with two different tokens")
        return [ids[0][0], ids[1][0]]

    def _clip(self, text: str, budget: int, keep_end: bool) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return text
        self.stats["truncated"] += 1
        return self.tokenizer.decode(ids[-budget:] if keep_end else ids[:budget])

    def _render(self, prompt: list[dict], a: str, b: str) -> list[int]:
        budget = max(self.max_length // 4, 16)  # request keeps its end, responses their start
        user = self.template.format(prompt=self._clip(render_prompt(prompt), budget, True),
                                    response_a=self._clip(a, budget, False), response_b=self._clip(b, budget, False))
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_length :]

    def _first_probs(self, items: list[tuple[list[dict], str, str]]) -> list[float]:
        raise NotImplementedError

    def _p_first(self, items: list[tuple[list[dict], str, str]]) -> list[float]:
        """P(the first slot wins) for each (prompt, first, second), from the two choice tokens only."""
        out = self._first_probs(items)
        self.stats["calls"] += len(items)
        self.stats["first_position_picks"] += sum(p > 0.5 for p in out)
        return out

    def compare(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[float]:
        t0 = time.perf_counter()
        p_ab = self._p_first(list(zip(prompts, a, b)))
        p_ba = self._p_first(list(zip(prompts, b, a)))
        self.stats["seconds"] += time.perf_counter() - t0
        return [combine_orders(x, y) for x, y in zip(p_ab, p_ba)]

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]:
        jobs = [(g, i, j) for g, group in enumerate(groups) for i, j in itertools.combinations(range(len(group)), 2)]
        probs = self.compare([prompts[g] for g, _, _ in jobs], [groups[g][i] for g, i, _ in jobs],
                             [groups[g][j] for g, _, j in jobs])
        prefer: list[dict] = [{} for _ in groups]
        for (g, i, j), p in zip(jobs, probs):
            prefer[g][(i, j)] = p
        return [round_robin(len(group), prefer[g]) for g, group in enumerate(groups)]

    @property
    def first_position_rate(self) -> float | None:
        verdicts = self.stats["calls"] - self.stats.get("garbage", 0)  # a garbage answer picked no slot
        return self.stats["first_position_picks"] / verdicts if verdicts > 0 else None

    def close(self) -> None:
        pass


def two_way_softmax(logit_first: float, logit_second: float) -> float:
    """P(first) from the two choice tokens' logits or log-probabilities alone."""
    m = max(logit_first, logit_second)
    w1, w2 = math.exp(logit_first - m), math.exp(logit_second - m)
    return w1 / (w1 + w2)


class JudgeScorer(PairwiseJudge):
    """The judge on transformers: the next-token logits of the two choice tokens."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_length: int = 1024, template: str = "", choices: tuple[str, str] = ("A", "B")):
        super().__init__(model_dir, batch_size, max_length, template, choices)
        self.model = load_causal_lm(model_dir, dtype=dtype, device=device)
        self.device = device

    @torch.no_grad()
    def _first_probs(self, items: list[tuple[list[dict], str, str]]) -> list[float]:
        rendered = [self._render(*it) for it in items]
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # length-sorted: little padding
        out = [0.0] * len(rendered)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            feats = [{"input_ids": rendered[i]} for i in chunk]
            batch = {k: v.to(self.device) for k, v in self.tokenizer.pad(feats, return_tensors="pt").items()}
            # vocabulary logits at the last position only (left padding: it is real), not at every position
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, self.choice_ids].float()
            for i, p in zip(chunk, torch.softmax(logits, dim=-1)[:, 0].tolist()):
                out[i] = p
        return out

    def close(self) -> None:
        del self.model


class VLLMJudgeScorer(PairwiseJudge):
    """The same judge on vLLM: one-token requests that ask for the log-probabilities of exactly the
    two choice tokens (SamplingParams.logprob_token_ids), so both are always there. vLLM returns them
    from the raw distribution (before temperature or any whitelist), as the hf judge reads them.
    `options` go to vllm.LLM (tensor_parallel_size, gpu_memory_utilization, kv_cache_gib, ...)."""

    def __init__(self, model_dir: Path, dtype: str = "auto", batch_size: int = 8, max_length: int = 4096,
                 template: str = "", choices: tuple[str, str] = ("A", "B"), options: dict | None = None):
        from tsalign.engines.vllm_engine import import_vllm, start_engine

        super().__init__(model_dir, batch_size, max_length, template, choices)
        self._vllm = import_vllm()
        self.llm = start_engine(model_dir, **{"dtype": str(dtype), "max_model_len": max_length + 8, **(options or {})})

    def _first_probs(self, items: list[tuple[list[dict], str, str]]) -> list[float]:
        from vllm.inputs import TokensPrompt

        from tsalign.engines.vllm_engine import engine_failed

        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(self.choice_ids))
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=self._render(*it)) for it in items], params,
                                        use_tqdm=False)
        except Exception as e:  # noqa: BLE001 -- e.g. EngineDeadError
            raise engine_failed(e, "judging") from None
        out = []
        for request in outputs:
            position = request.outputs[0].logprobs[0]  # token id -> Logprob at the one generated position
            if any(i not in position for i in self.choice_ids):  # never with logprob_token_ids: fail, not -inf
                raise TsalignError(f"vLLM returned no log-probability for a judge choice token {self.choice_ids}")
            out.append(two_way_softmax(*(position[i].logprob for i in self.choice_ids)))
        return out

    def close(self) -> None:
        from tsalign.engines.vllm_engine import stop_engine

        stop_engine(getattr(self, "llm", None))
        self.llm = None
