"""Reading served teachers' answers: pure functions over the JSON a server returned, no HTTP.

A judge's answer gives P(the first slot wins) from the two choice tokens' log-probabilities at the
first generated position when the server returns them, else from the parsed answer text (1 or 0).
Anything else is garbage: (None, why), and that item gets no verdict, never a made-up one. A reason
is `kind` or `kind: detail`; answers are counted by kind (GARBAGE_KINDS says what each means).
"""

from __future__ import annotations

import math
import re

from tsalign.engines.scoring.judge import two_way_softmax

# what each kind of garbage means and what to check: printed once per kind with its count
GARBAGE_KINDS = {
    "not JSON": "the URL is not the server's API (a web page, a proxy, a login): check teacher.served.base_url",
    "malformed response": "the JSON is not the shape teacher.served.api expects: check teacher.served.api",
    "no choice token": "the judge named neither choice: check its judge_prompt, judge_choices and served.max_tokens",
    "wrong number of rewards": "the reward model scored another number of texts than it was sent: check the "
                               "server's batching and teacher.served.api",
    "not one output": "the classifier has several outputs, a reward model one: serve a reward model",
    "not finite": "a reward is NaN, infinite or not a number: check the served model",
}


def garbage_kind(why: str) -> str:
    """The kind of a garbage reason (`kind` or `kind: detail`)."""
    return why.split(": ", 1)[0]


def logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def token_id_label(token_id: int) -> str:
    """How vLLM names a token when asked for ids (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}"


def first_position_logprobs(logprobs: dict | None, choices: tuple[str, str],
                            choice_token_ids: list[int] | None = None) -> tuple[list[float | None], float | None]:
    """([logprob of each choice or None], the lowest logprob returned) at the first generated position.
    A choice is matched by token id when ids were asked for, else by its text (spaces stripped; several
    spellings, e.g. "A" and " A", add up)."""
    try:
        first = logprobs["content"][0]
        alternatives = list(first.get("top_logprobs") or []) + [{"token": first["token"], "logprob": first["logprob"]}]
    except (KeyError, IndexError, TypeError):
        return [None, None], None
    labels = [token_id_label(i) for i in choice_token_ids] if choice_token_ids else None
    found: list[list[float]] = [[], []]
    seen, lowest = set(), None
    for alt in alternatives:
        token, lp = alt.get("token"), alt.get("logprob")
        if not isinstance(token, str) or not isinstance(lp, (int, float)) or token in seen:
            continue  # the sampled token is also among the alternatives: count it once
        seen.add(token)
        lowest = lp if lowest is None else min(lowest, lp)
        for k in range(2):
            if (token == labels[k]) if labels else (token.strip() == choices[k]):
                found[k].append(float(lp))
    return [logsumexp(f) if f else None for f in found], lowest


def parse_choice(text: str, choices: tuple[str, str]) -> int | None:
    """Which choice an answer text names: the whole answer (markdown and punctuation aside), else the one
    choice that appears as a word; None when neither or both appear."""
    bare = text.strip().strip("*_`'\".:;,()[]{} \n\t")
    for k, c in enumerate(choices):
        if bare == c:
            return k
    named = {k for k, c in enumerate(choices)
             if re.search(rf"(?<![A-Za-z0-9]){re.escape(c)}(?![A-Za-z0-9])", text)}
    return named.pop() if len(named) == 1 else None


def judge_verdict(body, choices: tuple[str, str], choice_token_ids: list[int] | None = None,
                  one_token: bool = True) -> tuple[float | None, str | None, str]:
    """(P(first slot wins) or None, why not, the answer text) from a chat-completion response.

    The first position's log-probabilities decide when both choices are there, or one is and the
    other fell below the lowest returned (then it counts at that lowest: the direction is right,
    the confidence understated) -- when the answer is one token long or starts with a choice token.
    Otherwise the answer text is parsed. Neither: garbage."""
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, "malformed response: no choices[0].message", ""
    (lp_a, lp_b), lowest = first_position_logprobs(choice.get("logprobs"), choices, choice_token_ids)
    first_is_choice = parse_choice(text.split()[0], choices) is not None if text.split() else False
    if (lp_a is not None or lp_b is not None) and (one_token or first_is_choice):
        return two_way_softmax(lp_a if lp_a is not None else lowest, lp_b if lp_b is not None else lowest), None, text
    picked = parse_choice(text, choices)
    if picked is None:
        return None, "no choice token", text
    return (1.0 if picked == 0 else 0.0), None, text


def usage(body) -> tuple[int, int]:
    """(prompt tokens, completion tokens) a response reports; (0, 0) when it reports none."""
    u = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(u, dict):
        return 0, 0
    return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def rewards(api: str, body, n: int) -> tuple[list[float] | None, str | None]:
    """The n rewards of one reward-model response (classify, score or openrlhf), or (None, why)."""
    try:
        if api == "openrlhf":
            values = body["rewards"]
        else:
            rows = sorted(body["data"], key=lambda r: r["index"])
            if api == "classify":
                if any(len(r["probs"]) != 1 for r in rows):
                    return None, f"not one output: the classifier has {len(rows[0]['probs'])}"
                values = [r["probs"][0] for r in rows]
            else:
                values = [r["score"] for r in rows]
    except (KeyError, IndexError, TypeError):
        return None, "malformed response: no rewards where teacher.served.api expects them"
    if not isinstance(values, list) or len(values) != n:
        got = len(values) if isinstance(values, list) else "no"
        return None, f"wrong number of rewards: {got} rewards for {n} texts"
    if not _finite(values):
        return None, f"not finite: {next(v for v in values if not _finite([v]))!r}"
    return [float(v) for v in values], None
