"""Preference pairs as TRL rows, and fitting them into a token budget without losing the response.

Pure helpers: a row is {"prompt": [messages], "chosen": [assistant message], "rejected": [...]} (TRL's
conversational preference format); the tokenizer is any HF tokenizer with a chat template.
"""

from __future__ import annotations


def response_text(messages_or_text) -> str:
    """The answer of a pair side: a plain string, or the last message's content."""
    return messages_or_text if isinstance(messages_or_text, str) else messages_or_text[-1]["content"]


def pairs_longer_wins(pairs: list[dict]) -> float:
    """The 'longer answer wins' baseline on preference pairs (stats.longer_wins_rate: ties half)."""
    from tsalign.algorithms.stats import longer_wins_rate

    return longer_wins_rate([len(response_text(p["chosen"])) for p in pairs],
                            [len(response_text(p["rejected"])) for p in pairs])


def to_trl_row(pair: dict) -> dict:
    """Keep what DPO trains on (role + content); provenance keys (margin, scores, ...) are dropped."""
    keys = ("prompt", "chosen", "rejected")
    return {k: [{"role": m["role"], "content": m["content"]} for m in pair[k]] for k in keys}


def chat_len(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> int:
    """Tokens of `messages` under the chat template, tokenized the way TRL's DPOTrainer does it."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt)
    return len(out["input_ids"])


def truncate_prompt_left(tokenizer, messages: list[dict], budget: int) -> list[dict]:
    """Cut the oldest prompt text until the templated prompt (assistant header included) fits `budget`
    tokens. A leading system message is kept; the oldest turns go whole, then the oldest remaining
    message loses the start of its text. Best effort: a prompt whose last message alone cannot fit
    comes back with that message emptied."""
    msgs = [dict(m) for m in messages]
    first = 1 if len(msgs) > 1 and msgs[0]["role"] == "system" else 0
    for _ in range(16):  # each pass re-measures: re-tokenizing at the cut can shift a token or two
        over = chat_len(tokenizer, msgs, add_generation_prompt=True) - budget
        if over <= 0:
            break
        ids = tokenizer(msgs[first]["content"], add_special_tokens=False)["input_ids"]
        if len(ids) <= over and len(msgs) - first > 1:
            del msgs[first]  # the whole oldest turn goes; a prompt may not open on an assistant turn
            while len(msgs) - first > 1 and msgs[first]["role"] == "assistant":
                del msgs[first]
            continue
        if not ids:
            break  # only an empty last message is left, and the prompt still does not fit
        msgs[first]["content"] = tokenizer.decode(ids[min(over, len(ids)):]).lstrip()
    return msgs


def fit_pair(tokenizer, row: dict, max_length: int) -> tuple[dict, dict]:
    """Make prompt + longer response fit `max_length` by cutting the prompt from the left.

    TRL 1.16 truncates prompt+response with "keep_start", which cuts the END of the response (its EOS
    included) and silently drops a pair whose prompt alone fills max_length. So the prompt is cut here
    instead, down to no less than max_length // 4 tokens; a response longer than the rest is the only
    thing TRL still cuts (reported as response_cut). Returns (row, {"prompt_cut", "response_cut"})."""
    p = chat_len(tokenizer, row["prompt"], add_generation_prompt=True)
    resp = max(chat_len(tokenizer, row["prompt"] + row[k]) - p for k in ("chosen", "rejected"))
    budget = max(max_length - resp, max_length // 4)
    cut = p > budget
    if cut:
        row = {**row, "prompt": truncate_prompt_left(tokenizer, row["prompt"], budget)}
        p = chat_len(tokenizer, row["prompt"], add_generation_prompt=True)
    return row, {"prompt_cut": cut, "response_cut": p + resp > max_length}
