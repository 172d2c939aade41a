"""Served teachers behind the Scorer protocol (tsalign/engines/scoring/base.py): a pairwise judge on an
OpenAI-compatible chat endpoint, and a reward model on vLLM's /classify or /score or OpenRLHF's
remote-RM shape. Every answer goes to the verdict ledger first, and is read from it before asking.

A question without a verdict (garbage answer) gives its group NaN scores: the caller makes no pair
from it and counts it. Garbage is kept apart in the ledger (asked again next run: `asked_again`) and
counted by kind (`garbage_kinds`), each kind printed once with its count when the scorer closes.
Stats: calls (comparisons or responses scored, ledger hits included), requests (sent over HTTP),
cached, garbage, asked_again, retries, tokens_in, tokens_out, seconds, cost, truncated.
"""

from __future__ import annotations

import itertools
import math
import time

from tsalign.engines.scoring.judge import check_template, combine_orders, round_robin
from tsalign.engines.scoring.reward_model import render_prompt
from tsalign.engines.scoring.served.answers import GARBAGE_KINDS, garbage_kind, judge_verdict, rewards, usage
from tsalign.engines.scoring.served.client import Answer, ServedClient, endpoint, short
from tsalign.engines.scoring.served.ledger import VerdictLedger, item_key
from tsalign.progress import say

STATS = ("calls", "requests", "cached", "garbage", "asked_again", "retries", "tokens_in", "tokens_out", "seconds",
         "cost", "truncated")


def clip(text: str, chars: int, keep_end: bool) -> tuple[str, bool]:
    """A text cut to `chars` characters (a request keeps its end, a response its start), and whether it was cut."""
    if len(text) <= chars:
        return text, False
    return (text[-chars:] if keep_end else text[:chars]), True


def no_verdict(n: int) -> list[float]:
    return [math.nan] * n


def garbage_line(kind: str, count: int, example: str, url: str) -> str:
    """One printed line per kind of garbage: how many, what it means, what came."""
    meaning = GARBAGE_KINDS.get(kind)
    return (f"{count} garbage answer{'s' * (count != 1)} from {url}: {kind}" + (f" ({meaning})" if meaning else "")
            + f"; first: {example}")


class ServedScorer:
    """What the judge and the reward model share: client, ledger, stats, cost."""

    PATH = ""  # the endpoint under base_url

    def __init__(self, client: ServedClient, ledger: VerdictLedger, max_chars: int, prices: tuple = (None, None)):
        self.client, self.ledger, self.max_chars, self.prices = client, ledger, max_chars, prices
        self.stats = {k: 0 for k in STATS} | {"seconds": 0.0, "cost": 0.0}
        self.garbage_examples: list[str] = []
        self.garbage_kinds: dict[str, list] = {}  # kind -> [count, the first answer's reason]

    @property
    def url(self) -> str:
        return endpoint(self.client.base_url, self.PATH)

    def _paid(self, answer: Answer, tokens_in: int, tokens_out: int) -> None:
        self.stats["requests"] += 1
        self.stats["retries"] += answer.retries
        self.stats["tokens_in"] += tokens_in
        self.stats["tokens_out"] += tokens_out
        price_in, price_out = self.prices
        self.stats["cost"] += tokens_in / 1000 * (price_in or 0.0) + tokens_out / 1000 * (price_out or 0.0)

    def _from_ledger(self, keys: list[str], field: str) -> tuple[list[float | None], list[int]]:
        """Answers the ledger already holds (never paid for twice), and the indices still to ask."""
        out: list[float | None] = [None] * len(keys)
        todo = []
        for n, key in enumerate(keys):
            known = self.ledger.get(key)
            if known is None:
                todo.append(n)
                self.stats["asked_again"] += self.ledger.was_garbage(key)
            else:
                out[n] = known[field]
                self.stats["cached"] += 1
        return out, todo

    def _garbage(self, why: str, keys: list[str]) -> None:
        """No verdict for these questions: counted by kind, kept apart in the ledger (asked again next run)."""
        self.stats["garbage"] += len(keys)
        if len(self.garbage_examples) < 5:
            self.garbage_examples.append(why)
        self.garbage_kinds.setdefault(garbage_kind(why), [0, why])[0] += len(keys)
        for key in keys:
            self.ledger.add_garbage(key, why)

    def garbage_lines(self) -> list[str]:
        """One line per kind of garbage answered since this scorer opened, and the questions asked again."""
        lines = [garbage_line(kind, count, example, self.url) for kind, (count, example) in self.garbage_kinds.items()]
        if self.stats["asked_again"]:
            lines.append(f"{self.stats['asked_again']} questions answered garbage before were asked again "
                         f"({self.ledger.path})")
        return lines

    def _clip(self, text: str, keep_end: bool) -> str:
        out, cut = clip(text, self.max_chars, keep_end)
        self.stats["truncated"] += cut
        return out

    def close(self) -> None:
        self.client.close()
        for line in self.garbage_lines():  # once per kind, when the stage is done asking (or failed)
            say(f"[served] {line}")


class ServedJudge(ServedScorer):
    """A pairwise judge over /v1/chat/completions, both orders asked (tsalign.engines.scoring.judge's rules)."""

    PATH = "/v1/chat/completions"

    def __init__(self, client: ServedClient, ledger: VerdictLedger, template: str, choices: tuple[str, str],
                 model: str | None, temperature: float, max_tokens: int, top_logprobs: int,
                 choice_token_ids: list[int] | None, max_chars: int, prices: tuple = (None, None)):
        check_template(template)
        super().__init__(client, ledger, max_chars, prices)
        self.template, self.choices, self.model = template, tuple(choices), model
        self.temperature, self.max_tokens, self.top_logprobs = temperature, max_tokens, top_logprobs
        self.choice_token_ids = list(choice_token_ids) if choice_token_ids else None
        self.stats["first_position_picks"] = 0

    def body(self, user: str) -> dict:
        out = {"messages": [{"role": "user", "content": user}], "max_tokens": self.max_tokens,
               "temperature": self.temperature, "logprobs": True, "top_logprobs": self.top_logprobs}
        if self.model:
            out["model"] = self.model
        if self.choice_token_ids:  # vLLM: exactly these tokens' log-probabilities, named by id
            out.update(logprob_token_ids=self.choice_token_ids, return_tokens_as_token_ids=True)
        return out

    def render(self, prompt: list[dict], first: str, second: str) -> str:
        return self.template.format(prompt=self._clip(render_prompt(prompt), True),
                                    response_a=self._clip(first, False), response_b=self._clip(second, False))

    def p_first(self, items: list[tuple[list[dict], str, str]]) -> list[float | None]:
        """P(first slot wins) per (prompt, first, second); None where the judge gave no verdict."""
        t0 = time.perf_counter()
        keys = [item_key("judge", p, a, b) for p, a, b in items]
        out, todo = self._from_ledger(keys, "p_first")
        for n, answer in self.client.post_many(self.PATH, todo, lambda n: self.body(self.render(*items[n]))):
            if answer.body is None:  # not JSON
                self._paid(answer, 0, 0)
                self._garbage(answer.garbage, [keys[n]])
                continue
            tokens_in, tokens_out = usage(answer.body)
            self._paid(answer, tokens_in, tokens_out)
            p, why, text = judge_verdict(answer.body, self.choices, self.choice_token_ids, self.max_tokens == 1)
            if p is None:  # with what came instead, for the line printed per kind
                came = f": {text[:80]!r}" if why == "no choice token" else f"; got {short(str(answer.body), 80)}"
                self._garbage(why + came, [keys[n]])
                continue
            self.ledger.add(keys[n], {"p_first": p, "text": text[:200], "tokens_in": tokens_in,
                                      "tokens_out": tokens_out})
            out[n] = p
        self.stats["calls"] += len(items)
        self.stats["first_position_picks"] += sum(p is not None and p > 0.5 for p in out)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def compare(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> list[float | None]:
        """P(a better than b) per pair from both orders; None when either order has no verdict."""
        both = self.p_first(list(zip(prompts, a, b)) + list(zip(prompts, b, a)))
        ab, ba = both[: len(a)], both[len(a) :]
        return [None if x is None or y is None else combine_orders(x, y) for x, y in zip(ab, ba)]

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]:
        jobs = [(g, i, j) for g, group in enumerate(groups) for i, j in itertools.combinations(range(len(group)), 2)]
        probs = self.compare([prompts[g] for g, _, _ in jobs], [groups[g][i] for g, i, _ in jobs],
                             [groups[g][j] for g, _, j in jobs])
        prefer: list[dict] = [{} for _ in groups]
        missing = set()
        for (g, i, j), p in zip(jobs, probs):
            if p is None:
                missing.add(g)
            prefer[g][(i, j)] = p
        return [no_verdict(len(group)) if g in missing else round_robin(len(group), prefer[g])
                for g, group in enumerate(groups)]

    @property
    def first_position_rate(self) -> float | None:
        """Of single-order verdicts given: a garbage answer gives none, and no verdict gives no rate."""
        verdicts = self.stats["calls"] - self.stats["garbage"]
        return self.stats["first_position_picks"] / verdicts if verdicts > 0 else None


class ServedRewardModel(ServedScorer):
    """A reward model over HTTP: classify (vLLM --runner pooling; texts from input_template, or chat
    messages when it is null), score (vLLM's cross-encoder pairs: prompt, response) or openrlhf."""

    PATHS = {"classify": "/classify", "score": "/score", "openrlhf": ""}

    def __init__(self, client: ServedClient, ledger: VerdictLedger, api: str, model: str | None,
                 input_template: str | None, batch_size: int, max_chars: int, prices: tuple = (None, None),
                 max_length: int | None = None):
        super().__init__(client, ledger, max_chars, prices)
        self.api, self.model, self.input_template, self.batch_size = str(api), model, input_template, batch_size
        self.max_length = max_length
        self.PATH = self.PATHS[self.api]

    def text(self, prompt: list[dict], response: str) -> str:
        return self.input_template.format(prompt=self._clip(render_prompt(prompt), True),
                                          response=self._clip(response, False))

    def requests(self, items: list[tuple[list[dict], str]], todo: list[int]) -> list[tuple[list[int], dict]]:
        """(item indices, body) per request: texts in batches, or one prompt's responses (score), or one
        conversation (classify on chat messages)."""
        common = {"model": self.model} if self.model else {}
        if self.max_length:  # vLLM cuts what is still longer than the teacher reads (a 400 otherwise)
            common["truncate_prompt_tokens"] = self.max_length
        if self.api == "score":
            by_prompt: dict[str, list[int]] = {}
            for n in todo:
                by_prompt.setdefault(render_prompt(items[n][0]), []).append(n)
            return [(ns, {**common, "text_1": self._clip(p, True), "text_2": [self._clip(items[n][1], False) for n in ns],
                          "use_activation": False}) for p, ns in by_prompt.items()]
        if self.api == "classify" and self.input_template is None:
            return [([n], {**common, "messages": items[n][0] + [{"role": "assistant", "content": self._clip(
                items[n][1], False)}], "use_activation": False}) for n in todo]
        out = []
        for start in range(0, len(todo), self.batch_size):
            ns = todo[start : start + self.batch_size]
            texts = [self.text(*items[n]) for n in ns]
            out.append((ns, {"query": texts} if self.api == "openrlhf" else  # left: the prompt is cut, not the answer
                        {**common, "input": texts, "use_activation": False, "truncation_side": "left"}))
        return out

    def score_texts(self, items: list[tuple[list[dict], str]]) -> list[float | None]:
        t0 = time.perf_counter()
        keys = [item_key("reward", p, r) for p, r in items]
        out, todo = self._from_ledger(keys, "reward")
        jobs = self.requests(items, todo)
        for (ns, _), answer in self.client.post_many(self.PATH, jobs, lambda job: job[1]):
            tokens_in, tokens_out = usage(answer.body)
            self._paid(answer, tokens_in, tokens_out)
            values, why = rewards(self.api, answer.body, len(ns)) if answer.body is not None else (None, answer.garbage)
            if values is None:
                self._garbage(why, [keys[n] for n in ns])
                continue
            for n, v in zip(ns, values):
                self.ledger.add(keys[n], {"reward": v, "tokens_in": tokens_in / len(ns)})
                out[n] = v
        self.stats["calls"] += len(items)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def score_groups(self, prompts: list[list[dict]], groups: list[list[str]]) -> list[list[float]]:
        flat = iter(self.score_texts([(p, r) for p, g in zip(prompts, groups) for r in g]))
        scores = [[next(flat) for _ in g] for g in groups]
        return [no_verdict(len(s)) if any(v is None for v in s) else s for s in scores]
