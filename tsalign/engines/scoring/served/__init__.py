"""A teacher served over HTTP (vLLM, SGLang, TGI, a hosted API) instead of loaded in this process.

    vllm serve-style:  python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name judge --port 8000
    tsalign stage=rank teacher=served_judge teacher.served.base_url=http://127.0.0.1:8000 teacher.served.model=judge

`teacher.served` (tsalign.config.schema.ServedOptions) says where and how; `make_served_scorer` gives a scorer
with the local teachers' protocol (tsalign/engines/scoring/base.py). Modules: client (HTTP, retries), ledger
(every answer kept under paths.cache), answers (reading responses), scorers (judge, reward model).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tsalign.config.choices import ModelKind, ServedApi
from tsalign.errors import TsalignError

JUDGE_APIS = (ServedApi.chat,)
REWARD_APIS = (ServedApi.classify, ServedApi.score, ServedApi.openrlhf)


def is_served(spec) -> bool:
    """Whether a model option (ModelSpec / its dict) names a served teacher."""
    served = spec.get("served") if hasattr(spec, "get") else None
    return bool(served and served.get("base_url"))


def check_options(kind: str, served: dict, judge_prompt: str | None, key: str = "teacher") -> None:
    """What a served teacher needs, before anything is asked: one line naming the key to fix."""
    check_url(served["base_url"], key)
    api = ServedApi(served["api"])
    if kind == ModelKind.judge and api not in JUDGE_APIS:
        raise TsalignError(f"{key}.served.api={api} serves a reward model, but {key}.kind=judge: set "
                           f"{key}.served.api=chat (or {key}.kind=reward_model)")
    if kind == ModelKind.reward_model and api not in REWARD_APIS:
        raise TsalignError(f"{key}.served.api={api} is a judge's endpoint, but {key}.kind=reward_model: set "
                           f"{key}.served.api to one of {', '.join(REWARD_APIS)} (or {key}.kind=judge)")
    if kind == ModelKind.judge and not judge_prompt:
        raise TsalignError(f"a served judge needs {key}.judge_prompt with {{prompt}}, {{response_a}}, {{response_b}}")
    if api == ServedApi.openrlhf and not served.get("input_template"):
        raise TsalignError(f"{key}.served.api=openrlhf sends texts: set {key}.served.input_template, e.g. "
                           "'{prompt}\\n\\n{response}'")
    for name in ("concurrency", "max_tokens", "top_logprobs"):
        if served[name] < 1:
            raise TsalignError(f"{key}.served.{name}={served[name]} must be >= 1")
    if served["timeout_s"] <= 0 or served["retries"] < 0:
        raise TsalignError(f"{key}.served.timeout_s must be > 0 and {key}.served.retries >= 0")
    if served.get("choice_token_ids") is not None and len(served["choice_token_ids"]) != 2:
        raise TsalignError(f"{key}.served.choice_token_ids must be two token ids (those of judge_choices)")
    api_key(served, key)


def check_url(base_url: str, key: str = "teacher") -> None:
    """An http(s) URL with a host: without a scheme every request fails the same way, which retries
    would otherwise report as a server that is down."""
    if not re.match(r"https?://[^/\s]", base_url or "", re.IGNORECASE):
        bare = re.sub(r"^([a-z][a-z0-9+.-]*:)?/+", "", base_url or "", flags=re.IGNORECASE) or "HOST:PORT"
        raise TsalignError(f"{key}.served.base_url={base_url} is not an http(s) URL: write "
                           f"{key}.served.base_url=http://{bare} (or https://)")


def api_key(served: dict, key: str = "teacher") -> str | None:
    """The API key from the environment variable served.api_key_env names (None when it names none)."""
    name = served.get("api_key_env")
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise TsalignError(f"{key}.served.api_key_env={name}, but ${name} is not set: export it (the key is read "
                           "from the environment only, never from a config file)")
    return value


def identity(kind: str, served: dict, judge_prompt: str | None, judge_choices, max_length: int) -> dict:
    """What makes two served teachers give the same answers: the ledger's key (never the API key)."""
    out = {"kind": str(kind), "api": str(served["api"]), "base_url": served["base_url"].rstrip("/"),
           "model": served.get("model"), "max_length": max_length}
    if kind == ModelKind.judge:
        out.update(template=judge_prompt, choices=list(judge_choices), temperature=served["temperature"],
                   max_tokens=served["max_tokens"], top_logprobs=served["top_logprobs"],
                   choice_token_ids=served.get("choice_token_ids"))
    else:
        out["input_template"] = served.get("input_template") if served["api"] != ServedApi.score else None
    return out


def max_chars(kind: str, max_length: int) -> int:
    """Characters kept of each part of a question, a token taken as about 4 characters (no tokenizer
    here): a judge's request and each response get a quarter of max_length tokens (as the local judge);
    a reward model's prompt and response half each (vLLM also truncates to max_length tokens itself)."""
    return max(max_length // 4, 16) * 4 if kind == ModelKind.judge else max_length * 2


def make_served_scorer(kind: str, served: dict, ledger_dir: str | Path, judge_prompt: str | None = None,
                       judge_choices=("A", "B"), max_length: int = 512, batch_size: int = 16):
    """A scorer for a served teacher: ServedJudge (kind judge) or ServedRewardModel (kind reward_model)."""
    from tsalign.engines.scoring.served.client import ServedClient
    from tsalign.engines.scoring.served.ledger import VerdictLedger
    from tsalign.engines.scoring.served.scorers import ServedJudge, ServedRewardModel

    check_options(kind, served, judge_prompt)
    client = ServedClient(served["base_url"], api_key(served), served["concurrency"], served["timeout_s"],
                          served["retries"], served["backoff_s"])
    ledger = VerdictLedger.open(ledger_dir, identity(kind, served, judge_prompt, judge_choices, max_length))
    prices = (served.get("price_in_per_1k"), served.get("price_out_per_1k"))
    chars = max_chars(kind, max_length)
    if kind == ModelKind.judge:
        return ServedJudge(client, ledger, judge_prompt, tuple(judge_choices), served.get("model"),
                           served["temperature"], served["max_tokens"], served["top_logprobs"],
                           served.get("choice_token_ids"), chars, prices)
    return ServedRewardModel(client, ledger, served["api"], served.get("model"), served.get("input_template"),
                             batch_size, chars, prices, max_length)


def cost_report(stats: dict, served: dict) -> dict:
    """The served-teacher part of a stage's metrics: calls, requests, ledger hits, garbage, tokens, cost."""
    keys = ("calls", "requests", "cached", "garbage", "retries", "tokens_in", "tokens_out")
    out = {k: round(stats.get(k, 0)) for k in keys}
    out["seconds"] = round(stats.get("seconds", 0.0), 2)
    priced = served.get("price_in_per_1k") is not None or served.get("price_out_per_1k") is not None
    out["cost"] = round(stats.get("cost", 0.0), 6) if priced else None
    return out


def no_verdict_line(url: str, prompts: int, stats: dict, kinds: dict[str, list]) -> str:
    """Why a served teacher gave no verdict at all (every answer garbage), in one line: the URL, what it
    answered (each kind's count, the commonest one's first answer and what it means) and the fix."""
    from tsalign.engines.scoring.served.answers import GARBAGE_KINDS

    if not kinds:  # answers from an earlier, interrupted attempt: counted, not described
        return (f"served teacher {url} gave no verdict on any of {prompts} prompts ({stats.get('garbage', 0):.0f} "
                "garbage answers); check the server and teacher.served.*, then rerun (garbage is asked again)")
    counts = ", ".join(f"{count} {kind}" for kind, (count, _) in kinds.items())
    kind, (_, first) = max(kinds.items(), key=lambda kv: kv[1][0])
    meaning = GARBAGE_KINDS.get(kind, "check the server and teacher.served.*")
    return (f"served teacher {url} gave no verdict on any of {prompts} prompts: {stats.get('garbage', 0):.0f} of "
            f"{stats.get('calls', 0):.0f} answers were garbage ({counts}; first: {first}): {meaning}, then rerun "
            "(garbage is asked again)")


def cost_line(report: dict) -> str:
    """One printed line: what the served teacher cost."""
    text = (f"served teacher: {report['requests']} requests ({report['cached']} answers from the ledger), "
            f"{report['tokens_in']} tokens in / {report['tokens_out']} out, {report['seconds']:.1f}s, "
            f"{report['garbage']} garbage, {report['retries']} retries")
    return text + (f", cost {report['cost']:.4f}" if report.get("cost") is not None else "")
