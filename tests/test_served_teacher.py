"""A served teacher (tsalign/engines/scoring/served) against a stub HTTP server on 127.0.0.1 (tests/stub_server.py):
reading answers, retries and their limits, garbage without verdicts, the verdict ledger, bounded
concurrency, the teacher budget in rank, a served judge in evaluate, and a rank killed with SIGKILL
halfway whose rerun asks nothing already answered (counted on the server)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, run_stage_inprocess
from omegaconf import OmegaConf
from stub_server import TEMPLATE, StubTeacher

from tsalign.config.schema import ServedOptions
from tsalign.engines.scoring import make_scorer
from tsalign.engines.scoring.served import check_options, identity
from tsalign.engines.scoring.served.answers import judge_verdict, parse_choice, rewards
from tsalign.engines.scoring.served.client import backoff_delay, endpoint
from tsalign.engines.scoring.served.ledger import VerdictLedger, item_key
from tsalign.errors import TsalignError

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
SHORT, LONG = "Paris.", "Paris is the capital and the largest city of France."


def options(url: str, **kw) -> dict:
    out = OmegaConf.to_container(OmegaConf.structured(ServedOptions))
    out.update(base_url=url, model=f"stub-{uuid.uuid4().hex[:8]}", backoff_s=0.01, timeout_s=5.0, retries=3)
    out.update(kw)
    return out


def judge(url: str, ledger_dir: Path, **kw):
    return make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=options(url, **kw),
                       ledger_dir=ledger_dir)


def reward_model(url: str, ledger_dir: Path, api: str, **kw):
    return make_scorer("reward_model", None, max_length=256, batch_size=2, served=options(url, api=api, **kw),
                       ledger_dir=ledger_dir)


# ---------------------------------------------------------------- pure parts


def test_backoff_doubles_honours_retry_after_and_is_capped():
    assert [backoff_delay(a, 0.5) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(3, 0.5, retry_after="2") == 2.0
    assert backoff_delay(0, 0.5, retry_after="Wed, 21 Oct 2015 07:28:00 GMT") == 0.5  # a date: our own backoff
    assert backoff_delay(30, 1.0) == 60.0 and backoff_delay(0, 1.0, retry_after="3600") == 60.0


def test_endpoint_does_not_double_v1():
    assert endpoint("http://h:8000", "/v1/chat/completions") == "http://h:8000/v1/chat/completions"
    assert endpoint("https://api.x.com/v1/", "/v1/chat/completions") == "https://api.x.com/v1/chat/completions"
    assert endpoint("http://h:5000/get_reward", "") == "http://h:5000/get_reward"


def chat(text: str, tops: list[tuple[str, float]] | None = None) -> dict:
    choice = {"message": {"content": text}}
    if tops is not None:
        choice["logprobs"] = {"content": [{"token": tops[0][0], "logprob": tops[0][1],
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in tops]}]}
    return {"choices": [choice]}


def test_judge_verdict_reads_logprobs_then_text_and_never_makes_one_up():
    p, why, _ = judge_verdict(chat("A", [("A", math.log(0.75)), (" B", math.log(0.25))]), ("A", "B"))
    assert p == pytest.approx(0.75) and why is None
    # " A" and "A" are the same choice: their probabilities add up
    p, _, _ = judge_verdict(chat("A", [("A", math.log(0.4)), (" A", math.log(0.2)), ("B", math.log(0.2))]), ("A", "B"))
    assert p == pytest.approx(0.75)
    # B fell out of the top: counted at the lowest returned log-probability (direction kept)
    p, _, _ = judge_verdict(chat("A", [("A", math.log(0.9)), ("The", math.log(0.05))]), ("A", "B"))
    assert p == pytest.approx(0.9 / 0.95)
    assert judge_verdict(chat("B"), ("A", "B"))[:2] == (0.0, None)  # no logprobs: the parsed answer
    assert judge_verdict(chat("**A**"), ("A", "B"))[0] == 1.0
    assert judge_verdict(chat("I cannot decide."), ("A", "B"))[:2] == (None, "no choice token")
    assert judge_verdict({"oops": 1}, ("A", "B"))[0] is None
    assert judge_verdict(chat("x", [("token_id:7", -0.1), ("token_id:9", -2.4)]), ("A", "B"), [7, 9])[0] > 0.5
    # a worded answer (max_tokens > 1) whose first token is not a choice: the text decides, not stray logprobs
    p, _, _ = judge_verdict(chat("The better one is B", [("The", -0.1), ("A", -3.0), ("B", -5.0)]), ("A", "B"),
                            one_token=False)
    assert p == 0.0


def test_parse_choice_needs_exactly_one_choice():
    assert parse_choice(" B.", ("A", "B")) == 1
    assert parse_choice("Response A is better", ("A", "B")) == 0
    assert parse_choice("A or B, hard to say", ("A", "B")) is None
    assert parse_choice("Absolutely", ("A", "B")) is None


def test_rewards_of_each_api_and_their_garbage():
    assert rewards("classify", {"data": [{"index": 1, "probs": [0.2]}, {"index": 0, "probs": [0.1]}]}, 2)[0] == [0.1, 0.2]
    assert rewards("score", {"data": [{"index": 0, "score": 3.0}]}, 1)[0] == [3.0]
    assert rewards("openrlhf", {"rewards": [1, 2]}, 2)[0] == [1.0, 2.0]
    assert rewards("openrlhf", {"rewards": [1]}, 2) == (None, "wrong number of rewards: 1 rewards for 2 texts")
    assert rewards("openrlhf", {"rewards": [1, float("nan")]}, 2)[0] is None
    assert rewards("classify", {"data": [{"index": 0, "probs": [0.1, 0.9]}]}, 1)[0] is None
    assert rewards("score", {"nope": []}, 1)[1].startswith("malformed response: ")


def test_ledger_survives_a_torn_line_and_a_glued_one(tmp_path):
    ledger = VerdictLedger(tmp_path / "l.jsonl")
    ledger.add("a", {"p_first": 0.7})
    with (tmp_path / "l.jsonl").open("ab") as f:
        f.write(b'{"key": "b", "ans')  # killed mid-line
    again = VerdictLedger(tmp_path / "l.jsonl")
    assert again.get("a") == {"p_first": 0.7} and again.get("b") is None
    again.add("c", {"p_first": 0.1})
    with (tmp_path / "l.jsonl").open("ab") as f:
        f.write(b'{"key": "d"')  # torn, and another process appends after it
    other = VerdictLedger.__new__(VerdictLedger)  # a process that opened the ledger before the tear
    other.path, other.rows, other.garbage = tmp_path / "l.jsonl", {}, {}
    other.add("e", {"p_first": 0.2})
    final = VerdictLedger(tmp_path / "l.jsonl")
    assert {k: final.get(k) for k in "acde"} == {"a": {"p_first": 0.7}, "c": {"p_first": 0.1}, "d": None,
                                                 "e": {"p_first": 0.2}}


def test_identity_ignores_the_api_key_and_how_the_calls_are_made():
    base = options("http://h:1", model="m")
    same = {**base, "api_key_env": "SOME_KEY", "concurrency": 1, "timeout_s": 9.0, "retries": 0}
    assert identity("judge", base, TEMPLATE, ("A", "B"), 256) == identity("judge", same, TEMPLATE, ("A", "B"), 256)
    assert identity("judge", base, TEMPLATE, ("A", "B"), 256) != identity("judge", {**base, "temperature": 0.5},
                                                                          TEMPLATE, ("A", "B"), 256)
    assert item_key("judge", PROMPT, "x", "y") != item_key("judge", PROMPT, "y", "x")


def test_options_are_checked_before_anything_is_asked(monkeypatch):
    with pytest.raises(TsalignError, match="teacher.served.api=chat"):
        check_options("reward_model", options("http://h:1"), None)
    with pytest.raises(TsalignError, match="teacher.served.api=classify serves a reward model"):
        check_options("judge", options("http://h:1", api="classify"), TEMPLATE)
    monkeypatch.delenv("TSALIGN_TEST_KEY", raising=False)
    with pytest.raises(TsalignError, match=r"\$TSALIGN_TEST_KEY is not set"):
        check_options("judge", options("http://h:1", api_key_env="TSALIGN_TEST_KEY"), TEMPLATE)
    with pytest.raises(TsalignError, match=r"base_url=h:1 is not an http\(s\) URL: write .*base_url=http://h:1 "):
        check_options("judge", options("h:1"), TEMPLATE)


# ---------------------------------------------------------------- against the stub


def test_judge_asks_both_orders_and_the_ledger_answers_a_second_time(stub, tmp_path):
    served = options(stub.url)
    first = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    scores = first.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT]])
    first.close()
    assert scores[0][1] > 0.5 > scores[0][0] and scores[1][0] > 0.5 > scores[1][1]  # the stub prefers longer
    assert len(stub.requests) == 4 and first.stats["requests"] == 4 and first.stats["calls"] == 4
    assert first.stats["tokens_in"] == 40 and first.stats["tokens_out"] == 4
    bodies = [b for _, b, _ in stub.requests]
    assert all(b["logprobs"] is True and b["top_logprobs"] == 20 and b["max_tokens"] == 1 for b in bodies)
    second = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    assert second.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT]]) == scores
    second.close()
    assert len(stub.requests) == 4 and second.stats["cached"] == 4 and second.stats["requests"] == 0


def test_text_only_answers_and_token_ids(stub, tmp_path):
    stub.mode = "text"
    j = judge(stub.url, tmp_path)
    assert j.score_groups([PROMPT], [[SHORT, LONG]]) == [[0.0, 1.0]]  # parsed answers: hard verdicts
    ids = judge(stub.url, tmp_path, choice_token_ids=[32, 33])
    assert ids.score_groups([PROMPT], [[SHORT, LONG]])[0][1] > 0.5
    assert stub.requests[-1][1]["logprob_token_ids"] == [32, 33]


def test_429_and_5xx_and_a_dropped_connection_are_retried(stub, tmp_path):
    stub.faults += ["429", "500", "drop", "503"]
    j = judge(stub.url, tmp_path, concurrency=1, retries=4)
    scores = j.score_groups([PROMPT], [[SHORT, LONG]])
    assert scores[0][1] > 0.5 and j.stats["retries"] == 4 and j.stats["garbage"] == 0
    assert len(stub.requests) == 6  # 4 failed + 2 answered, counted by the server


def test_retries_spent_is_one_line_naming_the_endpoint(stub, tmp_path):
    stub.faults += ["500"] * 4
    j = judge(stub.url, tmp_path, concurrency=1, retries=3)
    with pytest.raises(TsalignError) as e:
        j.score_groups([PROMPT], [[SHORT, LONG]])
    message = str(e.value)
    assert f"{stub.url}/v1/chat/completions" in message and "after 4 tries (HTTP 500)" in message
    assert "\n" not in message


def test_slow_answers_time_out_and_are_retried(stub, tmp_path):
    stub.slow_s = 1.5
    stub.faults += ["slow"]
    j = judge(stub.url, tmp_path, concurrency=1, timeout_s=0.5)
    assert j.score_groups([PROMPT], [[SHORT, LONG]])[0][1] > 0.5
    assert j.stats["retries"] == 1


def test_a_server_that_is_down_is_an_error_not_a_verdict(tmp_path):
    with StubTeacher() as gone:
        url = gone.url
    j = judge(url, tmp_path, retries=1)
    with pytest.raises(TsalignError, match=f"served teacher {url}/v1/chat/completions failed after 2 tries"):
        j.score_groups([PROMPT], [[SHORT, LONG]])


def test_401_fails_at_once_and_the_key_is_sent_but_never_stored(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("TSALIGN_TEST_KEY", "sk-secret-123")
    j = judge(stub.url, tmp_path, api_key_env="TSALIGN_TEST_KEY")
    j.score_groups([PROMPT], [[SHORT, LONG]])
    assert stub.requests[0][2].get("Authorization") == "Bearer sk-secret-123"
    assert all("sk-secret-123" not in p.read_text() for p in (tmp_path / "served").iterdir())
    stub.faults += ["401"]
    with pytest.raises(TsalignError, match="HTTP 401.*api_key_env"):
        judge(stub.url, tmp_path, api_key_env="TSALIGN_TEST_KEY", retries=3, concurrency=1).score_groups([PROMPT], [[LONG, SHORT]])
    assert len(stub.requests) == 3  # 401 is not retried


def test_garbage_gets_no_verdict_is_counted_and_asked_again(stub, tmp_path):
    served = options(stub.url, concurrency=1)
    stub.faults += ["garbage", "no_choice"]  # asked in order: pair 0 AB, pair 1 AB, pair 0 BA, pair 1 BA
    j = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    scores = j.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT + "!"]])
    assert all(math.isnan(s) for s in scores[0]) and all(math.isnan(s) for s in scores[1])
    assert j.stats["garbage"] == 2 and j.stats["requests"] == 4
    again = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    scores = again.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT + "!"]])
    # neither garbage answer was kept as final: both asked again (and answered now), the two verdicts read back
    assert scores[0][1] > 0.5 and scores[1][0] > 0.5
    assert again.stats["requests"] == 2 and again.stats["cached"] == 2 and again.stats["garbage"] == 0
    assert again.stats["asked_again"] == 2


def test_concurrency_is_bounded(stub, tmp_path):
    stub.delay_s = 0.15
    j = judge(stub.url, tmp_path, concurrency=3)
    j.score_groups([PROMPT] * 6, [[SHORT + str(i), LONG] for i in range(6)])  # 12 requests
    assert len(stub.requests) == 12 and stub.max_in_flight == 3


@pytest.mark.parametrize("api,kw,path", [("classify", {}, "/classify"), ("classify", {"input_template": None}, "/classify"),
                                         ("score", {}, "/score"), ("openrlhf", {}, "/reward")])
def test_reward_model_apis(stub, tmp_path, api, kw, path):
    base = stub.url + ("/reward" if api == "openrlhf" else "")
    rm = reward_model(base, tmp_path, api, **kw)
    scores = rm.score_groups([PROMPT, PROMPT], [[SHORT, LONG, "x"], [LONG]])
    assert scores[0][1] > scores[0][0] > scores[0][2] and len(scores[1]) == 1
    assert {p for p, _, _ in stub.requests} == {path} and rm.stats["calls"] == 4
    assert rm.stats["requests"] == {"classify": 2 if kw == {} else 4, "score": 1, "openrlhf": 2}[api]  # score: one request per prompt text
    again = reward_model(base, tmp_path, api, **{**kw, "model": rm_model(rm)})
    assert again.score_groups([PROMPT, PROMPT], [[SHORT, LONG, "x"], [LONG]]) == scores
    assert again.stats["cached"] == 4 and again.stats["requests"] == 0


def rm_model(rm) -> str:
    return rm.model


# ---------------------------------------------------------------- in the stages


def served_overrides(url: str, model: str, *extra: str) -> list[str]:
    return ["teacher=served_judge", f"teacher.served.base_url={url}", f"teacher.served.model={model}",
            "teacher.served.backoff_s=0.01", "teacher.max_length=256", "rank.audit_fraction=0", *extra]  # requests counted exactly: no audit


def test_rank_with_a_served_judge_budget_and_garbage(stub, tmp_path, clean_ledger):
    run_stage_inprocess("generate", tmp_path)  # model=tiny: 4 prompts x K=3
    model = f"stub-{uuid.uuid4().hex[:8]}"
    stub.faults += ["ok", "ok", "no_choice"]
    _, manifest = run_stage_inprocess("rank", tmp_path, served_overrides(
        stub.url, model, "rank.max_calls=6", "teacher.served.concurrency=1",
        "teacher.served.price_in_per_1k=0.5", "teacher.served.price_out_per_1k=2.0"))
    metrics = json.loads((tmp_path / "default" / "iter_0" / "rank" / "metrics.json").read_text())
    # best_worst: 2 calls (both orders) per prompt, 6 calls pay for 3 of 4 prompts; one answer named no choice
    assert metrics["teacher_budget"]["planned"] == 6 and metrics["no_pair"]["over_budget"] == 1
    assert metrics["no_pair"]["no_verdict"] == 1 and metrics["teacher_calls"] == 6 and len(stub.requests) == 6
    served = metrics["served"]
    assert served["requests"] == 6 and served["garbage"] == 1 and served["tokens_in"] == 60
    assert metrics["served_garbage"] == {"kinds": {"no choice token": 1}, "asked_again": 0}
    assert served["cost"] == pytest.approx(60 / 1000 * 0.5 + 6 / 1000 * 2.0)
    assert manifest["counts"]["served"] == served
    assert "sk-" not in json.dumps(manifest)
    scores = [json.loads(line) for line in (tmp_path / "default" / "iter_0" / "rank" / "scores.jsonl").open()]
    assert all(all(math.isfinite(x) for x in r["teacher_scores"]) for r in scores)  # no NaN written


def test_rank_uncertain_asks_only_where_the_student_is_unsure(stub, tmp_path, clean_ledger):
    run_stage_inprocess("generate", tmp_path)
    model = f"stub-{uuid.uuid4().hex[:8]}"
    run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, model, "rank.selection=uncertain",
                                                           "rank.uncertain_fraction=0.5"))
    metrics = json.loads((tmp_path / "default" / "iter_0" / "rank" / "metrics.json").read_text())
    assert metrics["teacher_prompts"] == 2 and metrics["student_decided"] == 2 and metrics["teacher_calls"] == 4
    pairs = [json.loads(line) for line in (tmp_path / "default" / "iter_0" / "rank" / "pairs.jsonl").open()]
    judges = {p["judge"] for p in pairs}
    assert judges <= {"served-judge", "tiny-bert-rm"} and metrics["agreement_pairs"] <= 2


def test_evaluate_with_a_served_judge_reports_its_cost(stub, tmp_path, clean_ledger):
    model = f"stub-{uuid.uuid4().hex[:8]}"
    for stage in ("generate", "rank", "distill", "dpo"):
        run_stage_inprocess(stage, tmp_path)
    _, manifest = run_stage_inprocess("evaluate", tmp_path, served_overrides(stub.url, model))
    metrics = json.loads((tmp_path / "default" / "iter_0" / "evaluate" / "metrics.json").read_text())
    assert metrics["judge"] == "served-judge" and metrics["served"]["requests"] == len(stub.requests) > 0
    assert metrics["no_verdict"] == {"main": 0, "control": 0} and metrics["n"] == 4


# ---------------------------------------------------------------- kill -9 halfway, rerun


def rank_process(outputs: Path, url: str, model: str) -> subprocess.Popen:
    args = ["stage=rank", "model=tiny", f"paths.outputs={outputs}", "rank.selection=all",
            *served_overrides(url, model, "teacher.served.concurrency=1")]
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "tsalign.cli", *args], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_rank_killed_halfway_reruns_without_asking_again(tmp_path, clean_ledger):
    run_stage_inprocess("generate", tmp_path)  # 4 prompts x K=3: selection=all asks 3 pairs x 2 orders each
    model = f"stub-{uuid.uuid4().hex[:8]}"
    with StubTeacher(delay_s=0.3, max_requests=60, max_seconds=300) as stub:
        proc = rank_process(tmp_path, stub.url, model)
        try:
            deadline = time.time() + 240
            while len(stub.requests) < 12 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            os.kill(proc.pid, signal.SIGKILL)  # halfway through the 24 verdicts
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        n_first = len(stub.requests)
        assert 12 <= n_first < 24
        # concurrency 1: a request is sent only once the answer before it is in the ledger, so every request
        # but the last one received was answered and kept (the last may have been cut by the kill)
        first_run = [json.dumps(b, sort_keys=True) for _, b, _ in stub.requests[: n_first - 1]]
        assert not (tmp_path / "default" / "iter_0" / "rank" / "manifest.json").exists()

        rerun = rank_process(tmp_path, stub.url, model)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out[-2000:]
        second_run = [json.dumps(b, sort_keys=True) for _, b, _ in stub.requests[n_first:]]
        assert not set(second_run) & set(first_run)  # no verdict received before is asked again
        assert len(set(first_run) | set(second_run)) == 24 and len(second_run) == 24 - len(first_run) - (
            json.dumps(stub.requests[n_first - 1][1], sort_keys=True) not in second_run)
        assert stub.overflow == 0
    metrics = json.loads((tmp_path / "default" / "iter_0" / "rank" / "metrics.json").read_text())
    assert metrics["teacher_calls"] == 24 and metrics["served"]["requests"] == len(second_run)
    assert "answers from the ledger" in out
