"""Prompt pools (embedded and local files), the held-out split, per-iteration shards, human pairs."""

from __future__ import annotations

import json

import pytest

from tsalign.data import (
    iteration_shard,
    load_human_labels,
    load_human_pairs,
    load_prompt_pool,
    split_pairs,
    split_pool,
    train_slice,
)
from tsalign.errors import TsalignError


def _pool(n):
    return [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


def _ids(rows):
    return [r["prompt_id"] for r in rows]


# ---------------------------------------------------------------- split and shards


def test_split_pool_is_deterministic_and_disjoint():
    pool = _pool(100)
    ev, train = split_pool(pool, 10, 20, seed=0)
    ev2, train2 = split_pool(pool, 10, 20, seed=0)
    assert _ids(ev) == _ids(ev2) and _ids(train) == _ids(train2)
    assert len(ev) == 10 and len(train) == 90
    assert not set(_ids(ev)) & set(_ids(train))
    assert sorted(_ids(ev) + _ids(train)) == sorted(_ids(pool))
    assert _ids(ev) != _ids(pool[:10])  # shuffled
    ev3, _ = split_pool(pool, 10, 20, seed=1)
    assert _ids(ev3) != _ids(ev)


def test_held_out_shard_does_not_depend_on_prompts_per_iteration():
    pool = _pool(100)
    assert _ids(split_pool(pool, 10, 20, 0)[0]) == _ids(split_pool(pool, 10, 40, 0)[0])


def test_split_pool_too_small():
    with pytest.raises(TsalignError, match="fewer than data.eval_prompts"):
        split_pool(_pool(10), 6, 5, 0)


def test_iteration_shard_fresh_and_reuse():
    _, train = split_pool(_pool(50), 10, 8, 0)
    s0 = iteration_shard(train, 0, 8, "fresh")
    s1 = iteration_shard(train, 1, 8, "fresh")
    assert len(s0) == len(s1) == 8
    assert not set(_ids(s0)) & set(_ids(s1))
    assert _ids(s0) == _ids(train[:8]) and _ids(s1) == _ids(train[8:16])
    r0 = iteration_shard(train, 0, 8, "reuse")
    r3 = iteration_shard(train, 3, 8, "reuse")
    assert _ids(r0) == _ids(r3) == _ids(s0)


def test_iteration_shard_exhaustion():
    _, train = split_pool(_pool(30), 10, 8, 0)  # 20 training prompts: 2 full shards of 8
    iteration_shard(train, 1, 8, "fresh")
    with pytest.raises(TsalignError, match="exhausted at iteration 2"):
        iteration_shard(train, 2, 8, "fresh")
    assert len(iteration_shard(train, 5, 8, "reuse")) == 8


def test_iteration_shard_max_prompts_and_bad_schedule():
    _, train = split_pool(_pool(50), 10, 8, 0)
    capped = iteration_shard(train, 1, 8, "fresh", max_prompts=3)
    assert _ids(capped) == _ids(iteration_shard(train, 1, 8, "fresh"))[:3]
    assert len(iteration_shard(train, 0, 8, "fresh", max_prompts=100)) == 8
    with pytest.raises(ValueError, match="not a valid Schedule"):
        iteration_shard(train, 0, 8, "sometimes")


# ---------------------------------------------------------------- local prompt files


ROWS = [
    {"instruction": "Translate to French.", "input": "Good morning"},
    {"instruction": "Name a colour.", "input": ""},
    {"instruction": "Name a colour.", "input": ""},  # duplicate: dropped
    {"instruction": "Count to three."},
]


def _check_rows(pool, tag):
    assert len(pool) == 3
    assert pool[0]["messages"] == [{"role": "user", "content": "Translate to French.\n\nGood morning"}]
    assert pool[1]["messages"] == [{"role": "user", "content": "Name a colour."}]
    assert pool[2]["messages"] == [{"role": "user", "content": "Count to three."}]
    assert len(set(_ids(pool))) == 3 and all(i.startswith(tag) for i in _ids(pool))


def test_prompt_file_json(tmp_path, cache_dir):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(ROWS))
    _check_rows(load_prompt_pool("file", cache_dir, str(path)), "prompts")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ROWS, "meta": {"v": 1}}))
    _check_rows(load_prompt_pool("file", cache_dir, str(wrapped)), "wrapped")


def test_prompt_file_jsonl(tmp_path, cache_dir):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    _check_rows(load_prompt_pool("file", cache_dir, str(path)), "prompts")


def test_prompt_file_parquet(tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": r.get("input")} for r in ROWS]),
                   path)
    _check_rows(load_prompt_pool("file", cache_dir, str(path)), "prompts")


def test_prompt_datasets_folder(tmp_path, cache_dir):
    import datasets

    path = tmp_path / "prompts_ds"
    datasets.Dataset.from_list([{"instruction": r["instruction"], "input": r.get("input") or ""} for r in ROWS]) \
        .save_to_disk(str(path))
    _check_rows(load_prompt_pool("file", cache_dir, str(path)), "prompts_ds")


def test_prompt_datasets_dict_folder(tmp_path, cache_dir):
    import datasets

    path = tmp_path / "dsdict"
    ds = datasets.Dataset.from_list([{"instruction": r["instruction"], "input": r.get("input") or ""} for r in ROWS])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    _check_rows(load_prompt_pool("file", cache_dir, str(path)), "dsdict")


def test_prompt_messages_lists_and_system_prompt(tmp_path, cache_dir):
    path = tmp_path / "chats.jsonl"
    chats = [
        {"conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        {"conversation": [{"role": "user", "content": "2+2?", "extra": 1}]},
        {"conversation": "plain text works too"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in chats))
    pool = load_prompt_pool("file", cache_dir, str(path), prompt_field="conversation", input_field=None,
                            system_prompt="You are helpful.")
    assert pool[0]["messages"] == chats[0]["conversation"]  # an existing system message is kept
    assert pool[1]["messages"] == [{"role": "system", "content": "You are helpful."},
                                   {"role": "user", "content": "2+2?"}]
    assert pool[2]["messages"][-1] == {"role": "user", "content": "plain text works too"}


def test_prompt_missing_field_names_the_field(tmp_path, cache_dir):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"question": "why?"}) + "\n")
    with pytest.raises(TsalignError, match="no field 'instruction'.*data.prompt_field"):
        load_prompt_pool("file", cache_dir, str(path))
    assert load_prompt_pool("file", cache_dir, str(path), prompt_field="question")[0]["messages"][0]["content"] == "why?"


@pytest.mark.parametrize("rows,message", [
    ([{"instruction": "   "}], "empty prompt"),
    ([{"instruction": 42}], "must be a string or a list"),
    ([{"instruction": [{"role": "user"}]}], "must be a string or a list"),
])
def test_prompt_bad_values(tmp_path, cache_dir, rows, message):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(TsalignError, match=message):
        load_prompt_pool("file", cache_dir, str(path))


def test_prompt_file_errors(tmp_path, cache_dir):
    with pytest.raises(TsalignError, match="prompt file not found: .*nope.jsonl"):
        load_prompt_pool("file", cache_dir, str(tmp_path / "nope.jsonl"))
    with pytest.raises(TsalignError, match="needs data.path"):
        load_prompt_pool("file", cache_dir, None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(TsalignError, match=rf"{bad}:2"):
        load_prompt_pool("file", cache_dir, str(bad))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "a"},\n')
    with pytest.raises(TsalignError, match="malformed JSON at line"):
        load_prompt_pool("file", cache_dir, str(bad_json))
    txt = tmp_path / "prompts.txt"
    txt.write_text("hello")
    with pytest.raises(TsalignError, match="unsupported prompt file type"):
        load_prompt_pool("file", cache_dir, str(txt))
    not_ds = tmp_path / "folder"
    not_ds.mkdir()
    with pytest.raises(TsalignError, match="not a `datasets` folder"):
        load_prompt_pool("file", cache_dir, str(not_ds))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(TsalignError, match="no prompts"):
        load_prompt_pool("file", cache_dir, str(empty))
    with pytest.raises(ValueError, match="not a valid DataSource"):
        load_prompt_pool("dolly", cache_dir)


# ---------------------------------------------------------------- embedded data (PyPI sdists)


def test_embedded_alpaca_eval(cache_dir):
    pool = load_prompt_pool("alpaca_eval", cache_dir)
    assert len(pool) == 805  # AlpacaEval's 805 instructions, none duplicated
    assert len(set(_ids(pool))) == len(pool)
    assert all(p["messages"][-1]["role"] == "user" and p["messages"][-1]["content"].strip() for p in pool)
    assert load_prompt_pool("alpaca_eval", cache_dir) == pool  # stable ids and order
    ev, train = split_pool(pool, 32, 32, 0)
    assert len(ev) == 32 and len(train) == 773


def test_embedded_alpaca(cache_dir):
    pool = load_prompt_pool("alpaca", cache_dir)
    assert len(pool) == 985  # 999 rows, 14 exact duplicates dropped
    assert len({json.dumps(p["messages"]) for p in pool}) == len(pool)


def test_human_pairs_embedded(cache_dir):
    pairs = load_human_pairs("llamafactory_dpo", cache_dir)
    assert len(pairs) == 300
    for p in pairs:
        assert p["prompt"] and p["prompt"][-1]["role"] == "user"
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in p["prompt"])
        assert p["chosen"] == [{"role": "assistant", "content": p["chosen"][0]["content"]}]
        assert p["rejected"][0]["role"] == "assistant"
    assert any(p["chosen"] != p["rejected"] for p in pairs)


def test_human_labels_embedded_and_from_file(tmp_path, cache_dir):
    rows = load_human_labels("llamafactory_kto", cache_dir)
    assert len(rows) == 300 and sum(r["label"] for r in rows) == 150
    assert all(r["prompt"][-1]["role"] == "user" and isinstance(r["response"], str) and r["response"] for r in rows)
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi", "response": "Hi!", "label": True}) + "\n")
    assert load_human_labels(str(path), cache_dir) == [
        {"prompt": [{"role": "user", "content": "Say hi"}], "response": "Hi!", "label": True}]
    path.write_text(json.dumps({"prompt": "Say hi", "response": "Hi!", "label": "yes"}) + "\n")
    with pytest.raises(TsalignError, match="row 1: labelled responses need prompt, response and a true/false label"):
        load_human_labels(str(path), cache_dir)


def test_human_pairs_from_file(tmp_path, cache_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}) + "\n")
    pairs = load_human_pairs(str(path), cache_dir)
    assert pairs == [{"prompt": [{"role": "user", "content": "Say hi"}],
                      "chosen": [{"role": "assistant", "content": "Hi!"}],
                      "rejected": [{"role": "assistant", "content": "No."}]}]
    path.write_text(json.dumps({"prompt": "Say hi", "chosen": "Hi!"}) + "\n")
    with pytest.raises(TsalignError, match="prompt, chosen and rejected"):
        load_human_pairs(str(path), cache_dir)


def test_train_ranges_split_the_fit_pairs_disjointly():
    """The teacher's [0, 0.75) and the student's [0.75, 1) share nothing and cover every non-held-out pair."""
    pairs = [{"prompt": f"q{i}"} for i in range(300)]
    train, held_out = split_pairs(pairs, 30, seed=0)
    teacher, student = train_slice(train, [0.0, 0.75]), train_slice(train, [0.75, 1.0])
    assert (len(teacher), len(student), len(held_out)) == (202, 68, 30)
    ids = lambda rows: {r["prompt"] for r in rows}  # noqa: E731
    assert not ids(teacher) & ids(student) and not (ids(teacher) | ids(student)) & ids(held_out)
    assert ids(teacher) | ids(student) | ids(held_out) == ids(pairs)
    assert train_slice(train, [0.0, 1.0]) == train


@pytest.mark.parametrize("bad", [[0.5, 0.5], [0.8, 0.2], [-0.1, 0.5], [0.0, 1.5]])
def test_a_bad_train_range_is_one_line_naming_the_key(bad):
    with pytest.raises(TsalignError, match=r"fit.train_range=.* must be two fractions"):
        train_slice([{}] * 10, bad)
