"""Faults that ended wrong with a served teacher (issue 26 items 1, 4, 8, 9): each now ends in one line naming
the cause and the fix, and nothing finished is replaced by something worse. Against the stub server on
127.0.0.1 (tests/stub_server.py: started and stopped by each test, bounded in requests and seconds) and the
tiny models."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pytest
from conftest import run_cli, run_stage_inprocess
from omegaconf import OmegaConf
from stub_server import TEMPLATE

from tsalign.config.schema import ServedOptions
from tsalign.engines.scoring import make_scorer
from tsalign.engines.scoring.served.client import ServedClient
from tsalign.engines.scoring.served.ledger import VerdictLedger
from tsalign.errors import TsalignError
from tsalign.stages.rank import first_position_rate

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
SHORT, LONG = "Paris.", "Paris is the capital and the largest city of France."
PAGE = "'<!DOCTYPE html><html><head><title>Welcome to nginx!</title><...'"  # the stub's page, cut to 60 characters
NEXT_STEP = ("the teacher was asked nothing and no pair was made; raise rank.max_calls or use "
             "rank.selection=student_only")


def options(url: str, **kw) -> dict:
    out = OmegaConf.to_container(OmegaConf.structured(ServedOptions))
    out.update(base_url=url, model=f"stub-{uuid.uuid4().hex[:8]}", backoff_s=0.01, timeout_s=5.0, retries=2)
    return out | kw


def served_overrides(url: str, model: str, *extra: str) -> list[str]:
    return ["teacher=served_judge", f"teacher.served.base_url={url}", f"teacher.served.model={model}",
            "teacher.served.backoff_s=0.01", "teacher.served.retries=1", "teacher.served.concurrency=2",
            "teacher.max_length=256", "rank.audit_fraction=0", *extra]  # requests counted exactly: no audit


def rank_dir(outputs: Path) -> Path:
    return outputs / "default" / "iter_0" / "rank"


def served_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[served] ")]


# ---------------------------------------------------------------- item 1: a web page for every answer


def test_a_web_page_for_every_answer_fails_rank_naming_the_server_and_keeps_the_finished_rank(
        stub, tmp_path, clean_ledger, capsys):
    run_stage_inprocess("generate", tmp_path)  # model=tiny: 4 prompts x K=3
    _, finished = run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, "judge-1"))
    calls, pairs_file = finished["counts"]["teacher_calls"], rank_dir(tmp_path) / "pairs.jsonl"
    assert finished["counts"]["pairs"] > 0 and calls > 0
    before = pairs_file.read_bytes()
    capsys.readouterr()

    stub.always = "html"  # base_url now answers HTTP 200 with a proxy's front page, every time
    n0 = len(stub.requests)
    with pytest.raises(TsalignError) as e:
        run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, "judge-2", "redo=true"))
    line, out = str(e.value), capsys.readouterr().out
    assert line.startswith(f"served teacher {stub.url}/v1/chat/completions gave no verdict on any of ")
    assert f"{calls} of {calls} answers were garbage ({calls} not JSON; first: not JSON: HTTP 200 text/html " \
           "'<!DOCTYPE html>" in line
    assert "check teacher.served.base_url, then rerun (garbage is asked again)" in line and "\n" not in line
    assert len(stub.requests) - n0 == calls
    # the finished rank is untouched, and no rate was computed over zero verdicts
    assert pairs_file.read_bytes() == before
    assert json.loads((rank_dir(tmp_path) / "manifest.json").read_text())["config"]["teacher"]["served"]["model"] \
        == "judge-1"
    assert "picked the first slot" not in out
    assert served_lines(out) == [f"[served] {calls} garbage answers from {stub.url}/v1/chat/completions: not JSON "
                                 "(the URL is not the server's API (a web page, a proxy, a login): check "
                                 f"teacher.served.base_url); first: not JSON: HTTP 200 text/html {PAGE}"]

    # item 4: the same URL fixed later is asked again, garbage never having been kept as an answer
    stub.always = "ok"
    n1 = len(stub.requests)
    _, redone = run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, "judge-2", "redo=true"))
    assert len(stub.requests) - n1 == calls and redone["counts"]["pairs"] > 0
    assert f"[served] {calls} questions answered garbage before were asked again" in capsys.readouterr().out
    metrics = json.loads((rank_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["served_garbage"] == {"kinds": {}, "asked_again": calls} and metrics["served"]["garbage"] == 0
    assert stub.overflow == 0


# ---------------------------------------------------------------- redo: nothing finished replaced by less


def test_a_redo_with_no_pair_keeps_the_finished_rank_unless_redo_allow_empty(tmp_path):
    run_stage_inprocess("generate", tmp_path)
    _, finished = run_stage_inprocess("rank", tmp_path)  # the tiny local teacher
    had, pairs_file = finished["counts"]["pairs"], rank_dir(tmp_path) / "pairs.jsonl"
    before = pairs_file.read_bytes()
    assert had > 0
    no_pair = ["redo=true", "rank.tie_threshold=1000000"]  # every teacher gap is a tie: no pair
    with pytest.raises(TsalignError) as e:
        run_stage_inprocess("rank", tmp_path, no_pair)
    assert str(e.value).startswith("this redo of iter_0/rank made 0 pairs (no_pair: {")
    assert str(e.value).endswith(f"where the finished one has {had}; it was kept: fix the cause, or add "
                                 "redo_allow_empty=true to replace it")
    assert pairs_file.read_bytes() == before
    _, empty = run_stage_inprocess("rank", tmp_path, [*no_pair, "redo_allow_empty=true"])
    assert empty["counts"]["pairs"] == 0 and pairs_file.read_bytes() == b""


# ---------------------------------------------------------------- item 4: garbage kinds, kept apart, asked again


def test_garbage_is_printed_once_per_kind_kept_apart_and_asked_again(stub, tmp_path, capsys):
    served = options(stub.url, concurrency=1)
    stub.faults += ["no_choice", "no_choice", "html"]  # of 4 questions: pair 0 AB, pair 1 AB, pair 0 BA, pair 1 BA
    j = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    scores = j.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT + "!"]])
    j.close()
    assert all(math.isnan(s) for group in scores for s in group) and j.stats["garbage"] == 3
    url = f"{stub.url}/v1/chat/completions"
    assert served_lines(capsys.readouterr().out) == [
        f"[served] 2 garbage answers from {url}: no choice token (the judge named neither choice: check its "
        "judge_prompt, judge_choices and served.max_tokens); first: no choice token: 'I cannot decide.'",
        f"[served] 1 garbage answer from {url}: not JSON (the URL is not the server's API (a web page, a proxy, a "
        f"login): check teacher.served.base_url); first: not JSON: HTTP 200 text/html {PAGE}"]
    ledger = VerdictLedger(j.ledger.path)
    assert len(ledger) == 1 and len(ledger.garbage) == 3  # kept apart, not as answers
    again = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=served, ledger_dir=tmp_path)
    scores = again.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, SHORT + "!"]])
    again.close()
    assert scores[0][1] > 0.5 and scores[1][0] > 0.5
    assert again.stats["requests"] == 3 and again.stats["asked_again"] == 3 and again.stats["cached"] == 1
    assert served_lines(capsys.readouterr().out) == [
        f"[served] 3 questions answered garbage before were asked again ({again.ledger.path})"]


def test_a_reward_model_short_of_rewards_says_so(stub, tmp_path, capsys):
    stub.faults += ["few_rewards"]
    rm = make_scorer("reward_model", None, max_length=256, batch_size=2, ledger_dir=tmp_path,
                     served=options(stub.url + "/reward", api="openrlhf", concurrency=1))
    scores = rm.score_groups([PROMPT, PROMPT], [[SHORT, LONG], [LONG, "x"]])
    rm.close()
    assert all(math.isnan(s) for s in scores[0]) and scores[1][0] > scores[1][1]
    assert served_lines(capsys.readouterr().out) == [
        f"[served] 2 garbage answers from {stub.url}/reward: wrong number of rewards (the reward model scored another "
        "number of texts than it was sent: check the server's batching and teacher.served.api); first: wrong number "
        "of rewards: 1 rewards for 2 texts"]


def test_an_old_kept_no_choice_answer_is_asked_again_and_a_final_answer_wins(tmp_path):
    path = tmp_path / "l.jsonl"
    old = {"key": "k", "answer": {"p_first": None, "why": "no choice token", "text": "I cannot decide."}}
    path.write_text(json.dumps(old) + "\n")  # written by a ledger from before garbage was kept apart
    ledger = VerdictLedger(path)
    assert ledger.get("k") is None and ledger.was_garbage("k")
    ledger.add("k", {"p_first": 0.8})
    ledger.add_garbage("k", "not JSON: late")  # another process's garbage after the answer: the answer stays
    again = VerdictLedger(path)
    assert again.get("k") == {"p_first": 0.8} and not again.was_garbage("k")


def test_the_position_bias_rate_is_not_computed_over_zero_verdicts(stub, tmp_path):
    assert first_position_rate({"calls": 8, "garbage": 8, "first_position_picks": 0}) is None
    assert first_position_rate({"calls": 8, "garbage": 4, "first_position_picks": 2}) == 0.5
    stub.always = "html"
    j = make_scorer("judge", None, judge_prompt=TEMPLATE, max_length=256, served=options(stub.url), ledger_dir=tmp_path)
    j.score_groups([PROMPT], [[SHORT, LONG]])
    j.close()
    assert j.stats["calls"] == 2 and j.stats["garbage"] == 2 and j.first_position_rate is None


def test_evaluate_counts_first_slot_picks_over_verdicts_not_calls():
    """The control's position check divides by verdicts given: 4 calls of which 2 garbage and 1 first-slot pick is
    1 of 2 (0.5, passes), not 1 of 4."""
    from tsalign.stages.evaluate import judge_pairs

    class HalfGarbage:
        stats = {"calls": 10, "garbage": 1, "first_position_picks": 3}  # earlier calls: not this judging's

        def score_groups(self, prompts, groups):
            self.stats = {"calls": self.stats["calls"] + 4, "garbage": self.stats["garbage"] + 2,
                          "first_position_picks": self.stats["first_position_picks"] + 1}
            return [[0.5, 0.5] for _ in groups]

    scores, picks = judge_pairs([PROMPT], [SHORT], [LONG], HalfGarbage())
    assert picks == {"first_position_picks": 1, "verdicts": 2}


# ---------------------------------------------------------------- item 8: a budget that pays for nothing


def test_max_calls_zero_names_the_next_step(stub, tmp_path, clean_ledger):
    run_stage_inprocess("generate", tmp_path)
    with pytest.raises(TsalignError) as e:  # refused at check time: nothing loaded, nothing asked
        run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, "judge", "rank.max_calls=0"))
    assert str(e.value) == f"rank.max_calls=0: {NEXT_STEP}"
    assert stub.requests == [] and not (rank_dir(tmp_path) / "manifest.json").exists()
    # a budget below one prompt's cost (a judge asks both orders: 2 calls) is found once the shortlists are made
    with pytest.raises(TsalignError) as e:
        run_stage_inprocess("rank", tmp_path, served_overrides(stub.url, "judge", "rank.max_calls=1"))
    assert str(e.value).startswith("rank.max_calls=1 pays for none of ")
    assert str(e.value).endswith(f" prompts (the cheapest costs 2 teacher calls): {NEXT_STEP}")
    assert stub.requests == []
    # what the user sees: one line, exit 2
    done = run_cli(["stage=rank", "model=tiny", f"paths.outputs={tmp_path}", "rank.max_calls=0"], timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"tsalign: error: rank.max_calls=0: {NEXT_STEP}", done.stderr[-2000:]


# ---------------------------------------------------------------- item 9: a base_url without a scheme


def test_a_base_url_without_a_scheme_is_refused_at_check_time(stub, tmp_path, clean_ledger):
    run_stage_inprocess("generate", tmp_path)
    bare = stub.url.removeprefix("http://")
    with pytest.raises(TsalignError) as e:
        run_stage_inprocess("rank", tmp_path, served_overrides(bare, "judge"))
    assert str(e.value) == (f"teacher.served.base_url={bare} is not an http(s) URL: write "
                            f"teacher.served.base_url=http://{bare} (or https://)")
    assert stub.requests == []
    # the client, reached some other way, fails at once instead of retrying "is the server up?"
    client = ServedClient(bare, retries=5, backoff_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(TsalignError, match=rf"teacher.served.base_url={bare} is not an http\(s\) URL"):
        client.post("/v1/chat/completions", {})
    client.close()
    assert time.perf_counter() - t0 < 1.0 and stub.requests == []
