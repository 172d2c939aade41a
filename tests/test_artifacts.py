"""The artifact contract: atomic writes, JSONL errors, manifests and skip-or-run, partial rows."""

from __future__ import annotations

import json
import os

import pytest

from tsalign.artifacts.store import (
    MANIFEST,
    ConfigChanged,
    PartialRows,
    StageRun,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    config_hash,
    fingerprint,
    read_jsonl,
    read_manifest,
    stage_dir,
    stage_lock,
)
from tsalign.errors import TsalignError


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- atomic writes


def test_atomic_writes_replace_content_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"

    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"

    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]})
    atomic_write_json(tmp_path / "c.json", {"y": 3})
    assert json.loads((tmp_path / "c.json").read_text()) == {"y": 3}

    rows = [{"id": i, "text": "héllo"} for i in range(3)]
    atomic_write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_jsonl(tmp_path / "d.jsonl") == rows
    atomic_write_jsonl(tmp_path / "d.jsonl", rows[:1])
    assert read_jsonl(tmp_path / "d.jsonl") == rows[:1]

    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "c.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"bad": object()}])  # not JSON-serialisable: fails before any write
    assert json.loads(target.read_text()) == {"ok": True}
    assert _leftovers(tmp_path) == []


def test_atomic_dir_creates_and_replaces(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "weights.bin").write_text("v1")
    assert (target / "weights.bin").read_text() == "v1"

    with atomic_dir(target) as tmp:
        (tmp / "other.bin").write_text("v2")
        assert (target / "weights.bin").exists()  # the old one stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old dirs left


def test_atomic_dir_cleans_up_on_exception(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights.bin").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_text("half")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "new"):
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------- read_jsonl


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,\n{"a": 4}\n')
    with pytest.raises(TsalignError, match=rf"{path}:4: malformed JSON"):
        read_jsonl(path)


def test_read_jsonl_rejects_non_objects_and_missing_files(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(TsalignError, match=rf"{path}:2: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(TsalignError, match="prompt file not found"):
        read_jsonl(tmp_path / "nope.jsonl", "prompt file")


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\n{"a": 1}\n   \n{"a": 2}')  # no final newline either
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


# ---------------------------------------------------------------- fingerprints


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_fingerprint_of_file_and_dir(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    before = fingerprint(f)
    f.write_text("y")
    assert fingerprint(f) != before

    d = tmp_path / "policy"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.bin").write_text("w")
    base = fingerprint(d)
    (d / ".lock").write_text("")
    (d / ".w.bin.123.tmp").write_text("half")
    (d / "sub" / ".hidden").write_text("h")
    (d / MANIFEST).write_text('{"wall_time_s": 1}')
    assert fingerprint(d) == base  # dotfiles and manifest.json do not define content
    (d / MANIFEST).write_text('{"wall_time_s": 2}')
    assert fingerprint(d) == base
    (d / "sub" / "w.bin").write_text("w2")
    assert fingerprint(d) != base
    (d / "sub" / "w.bin").write_text("w")
    (d / "sub" / "w.bin").rename(d / "sub" / "v.bin")
    assert fingerprint(d) != base  # names count too


def test_fingerprint_of_missing_input(tmp_path):
    with pytest.raises(TsalignError, match="input not found"):
        fingerprint(tmp_path / "nothing")


# ---------------------------------------------------------------- StageRun


def _run(tmp_path, config=None, inputs=None, redo=False):
    return StageRun(stage_dir(tmp_path, 0, "rank"), "rank", 0, config or {"a": 1, "nested": {"b": 2}},
                    inputs or {}, redo)


def test_stage_dir_layout(tmp_path):
    assert stage_dir(tmp_path, 3, "dpo") == tmp_path / "iter_3" / "dpo"


def test_stage_run_lifecycle(tmp_path):
    run = _run(tmp_path)
    assert not run.is_done()
    run.begin()
    assert run.directory.is_dir() and not run.is_done()
    out = run.directory / "pairs.jsonl"
    atomic_write_jsonl(out, [{"x": 1}])
    manifest = run.finish({"pairs": 1}, {"pairs": out}, {"note": "hi"})
    assert manifest["outputs"] == {"pairs": "pairs.jsonl"}
    assert manifest["counts"] == {"pairs": 1} and manifest["note"] == "hi"
    assert manifest["config_hash"] == config_hash(run.config)
    assert "python" in manifest["versions"] and "torch" in manifest["versions"]
    assert read_manifest(run.directory) == manifest
    assert _run(tmp_path).is_done()


def test_stage_run_changed_config_raises(tmp_path):
    run = _run(tmp_path)
    run.begin()
    run.finish({}, {})
    changed = _run(tmp_path, {"a": 1, "nested": {"b": 3}})
    with pytest.raises(ConfigChanged, match="redo=true") as info:
        changed.is_done()
    assert "nested.b" in str(info.value)
    assert isinstance(info.value, TsalignError)
    assert _run(tmp_path, {"a": 1, "nested": {"b": 3}}, redo=True).is_done() is False
    assert _run(tmp_path, {"a": 1, "nested": {"b": 2}, "new_key": 0}, redo=True).is_done() is False
    with pytest.raises(ConfigChanged, match="new_key"):
        _run(tmp_path, {"a": 1, "nested": {"b": 2}, "new_key": 0}).is_done()


def _dpo_run(tmp_path, dpo: dict, redo: bool = False) -> StageRun:
    """A dpo slice; dpo.save_steps is a schema key (default 10) that is not in dpo's v1 keys (format_v1.json):
    it stands for an option added after v1."""
    return StageRun(stage_dir(tmp_path, 0, "dpo"), "dpo", 0, {"iteration": 0, "dpo": {"beta": 0.1, **dpo}}, {}, redo)


def test_a_key_added_since_v1_is_hashed_only_off_its_default(tmp_path):
    made_before = _dpo_run(tmp_path, {})
    made_before.begin()
    manifest = made_before.finish({}, {})
    assert manifest["config_hash"] == config_hash({"iteration": 0, "dpo": {"beta": 0.1}})  # v1 keys: as always

    at_default = _dpo_run(tmp_path, {"save_steps": 10})
    assert at_default.hashed == made_before.config and at_default.stamp() == made_before.stamp()
    assert at_default.is_done()
    with pytest.raises(ConfigChanged, match=r"changed: dpo\.save_steps\)"):
        _dpo_run(tmp_path, {"save_steps": 5}).is_done()


def test_a_v1_key_is_hashed_even_at_its_default(tmp_path):
    """dpo.beta (default 0.1) is in dpo's v1 keys: a slice without it is another config."""
    run = _dpo_run(tmp_path, {})
    assert run.hashed == run.config
    run.begin()
    run.finish({}, {})
    without_beta = StageRun(run.directory, "dpo", 0, {"iteration": 0, "dpo": {}})
    with pytest.raises(ConfigChanged, match=r"changed: dpo\.beta\)"):
        without_beta.is_done()


def test_a_key_set_off_its_default_stays_hashed_after_it_returns_to_it(tmp_path):
    """A manifest records its config whole: a stage made with save_steps=5 is not what save_steps=10 makes."""
    run = _dpo_run(tmp_path, {"save_steps": 5})
    run.begin()
    assert run.finish({}, {})["config"]["dpo"] == {"beta": 0.1, "save_steps": 5}
    with pytest.raises(ConfigChanged, match="dpo.save_steps"):
        _dpo_run(tmp_path, {"save_steps": 10}).is_done()


def test_stage_run_changed_input_raises(tmp_path):
    upstream = tmp_path / "iter_0" / "generate" / "candidates.jsonl"
    atomic_write_jsonl(upstream, [{"x": 1}])
    run = _run(tmp_path, inputs={"candidates": upstream})
    run.begin()
    manifest = run.finish({}, {})
    assert manifest["inputs"]["candidates"]["sha256"] == fingerprint(upstream)
    assert _run(tmp_path, inputs={"candidates": upstream}).is_done()

    atomic_write_jsonl(upstream, [{"x": 2}])
    with pytest.raises(ConfigChanged, match="input:candidates") as info:
        _run(tmp_path, inputs={"candidates": upstream}).is_done()
    assert "redo=true" in str(info.value)
    assert _run(tmp_path, inputs={"candidates": upstream}, redo=True).is_done() is False


def test_a_redo_replaces_finished_work_only_when_it_has_finished(tmp_path):
    run = _run(tmp_path)
    work = run.begin()
    atomic_write_jsonl(work / "pairs.jsonl", [{"old": 1}])
    old = run.finish({}, {"pairs": work / "pairs.jsonl"})
    old_bytes = (run.directory / "pairs.jsonl").read_bytes()

    redo = _run(tmp_path, {"a": 2}, redo=True)
    assert not redo.is_done()
    staging = redo.begin()
    assert staging != redo.directory and staging.parent == redo.directory.parent
    atomic_write_jsonl(staging / "pairs.jsonl", [{"new": 1}])
    # the new attempt dies here: the finished stage is untouched and still done
    assert read_manifest(redo.directory) == old
    assert (redo.directory / "pairs.jsonl").read_bytes() == old_bytes
    assert _run(tmp_path).is_done()

    again = _run(tmp_path, {"a": 2}, redo=True)
    work = again.begin()
    assert work == staging and (work / "pairs.jsonl").is_file()  # a rerun of the redo resumes in staging
    manifest = again.finish({}, {"pairs": work / "pairs.jsonl"})
    assert read_manifest(again.directory) == manifest and manifest["config"] == {"a": 2}
    assert read_jsonl(again.directory / "pairs.jsonl") == [{"new": 1}]
    assert not staging.exists()
    assert _run(tmp_path, {"a": 2}).is_done()


def test_damaged_outputs_are_not_done_and_name_the_stage_to_redo(tmp_path):
    run = _run(tmp_path)
    work = run.begin()
    atomic_write_jsonl(work / "pairs.jsonl", [{"x": i} for i in range(3)])
    run.finish({}, {"pairs": work / "pairs.jsonl"})
    pairs = run.directory / "pairs.jsonl"
    os.utime(pairs, ns=(1, 1))  # a copy without mtimes: content unchanged, still fine
    assert _run(tmp_path).is_done()
    assert fingerprint(pairs)
    pairs.write_text(pairs.read_text().splitlines(keepends=True)[0])  # cut at a line boundary
    with pytest.raises(TsalignError, match=r"changed or damaged after iter_0/rank.*stage=rank iteration=0 redo=true"):
        _run(tmp_path).is_done()
    with pytest.raises(TsalignError, match="redo=true"):
        fingerprint(pairs)  # what a downstream stage does before reading it


def test_stage_lock_is_exclusive(tmp_path):
    d = tmp_path / "iter_0" / "generate"
    with stage_lock(d), pytest.raises(TsalignError, match="another tsalign process"), stage_lock(d):
        pass
    with stage_lock(d):  # released
        pass


# ---------------------------------------------------------------- PartialRows


def test_partial_rows_resume(tmp_path):
    path = tmp_path / "_work" / "rows.partial.jsonl"
    rows = PartialRows(path, "id", {"t": 1})
    assert "a" not in rows
    rows.extend([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    rows.extend([{"id": "c", "v": 3}])
    again = PartialRows(path, "id", {"t": 1})
    assert list(again.rows) == ["a", "b", "c"] and again.rows["b"]["v"] == 2
    assert "c" in again


def test_partial_rows_drop_a_truncated_last_line(tmp_path):
    path = tmp_path / "_work" / "rows.partial.jsonl"
    PartialRows(path, "id", {"t": 1}).extend([{"id": "a"}, {"id": "b"}])
    with path.open("a") as f:
        f.write('{"id": "c", "te')  # killed mid-write
    again = PartialRows(path, "id", {"t": 1})
    assert list(again.rows) == ["a", "b"]


def test_partial_rows_keep_work_appended_after_a_truncated_line(tmp_path):
    """The resumed run appends after the cut line; its rows must survive the next resume."""
    path = tmp_path / "_work" / "rows.partial.jsonl"
    PartialRows(path, "id", {"t": 1}).extend([{"id": "a"}, {"id": "b"}])
    with path.open("a") as f:
        f.write('{"id": "c", "te')
    PartialRows(path, "id", {"t": 1}).extend([{"id": "c"}, {"id": "d"}])
    assert list(PartialRows(path, "id", {"t": 1}).rows) == ["a", "b", "c", "d"]


def test_partial_rows_discarded_when_config_changes(tmp_path):
    path = tmp_path / "_work" / "rows.partial.jsonl"
    PartialRows(path, "id", {"t": 1}).extend([{"id": "a"}])
    changed = PartialRows(path, "id", {"t": 2})
    assert changed.rows == {}
    changed.extend([{"id": "z"}])
    assert list(PartialRows(path, "id", {"t": 2}).rows) == ["z"]
    assert PartialRows(path, "id", {"t": 1}).rows == {}  # and back again: nothing of t=2 is reused


def test_partial_rows_file_is_fsynced_jsonl(tmp_path):
    path = tmp_path / "_work" / "rows.partial.jsonl"
    PartialRows(path, "id", {"t": 1}).extend([{"id": "a", "text": "ü"}])
    assert read_jsonl(path) == [{"id": "a", "text": "ü"}]
    assert os.path.getsize(path) > 0


def test_finished_outputs_are_fingerprinted_once_from_their_manifest(tmp_path):
    """Readers take a finished output's hash from its manifest instead of re-reading the content."""
    from tsalign.artifacts.store import StageRun, atomic_write_text, content_fingerprint, fingerprint

    stage = tmp_path / "iter_0" / "dpo"
    (stage / "policy").mkdir(parents=True)
    atomic_write_text(stage / "policy" / "weights.bin", "abc")
    unfinished = fingerprint(stage / "policy")
    assert unfinished == content_fingerprint(stage / "policy")

    run = StageRun(stage, "dpo", 0, {"beta": 0.1})
    run.begin()
    manifest = run.finish({}, {"policy": stage / "policy"})
    assert manifest["output_sha256"] == {"policy": unfinished}
    calls = []
    import tsalign.artifacts.store as artifacts

    real = artifacts.content_fingerprint
    artifacts.content_fingerprint = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert fingerprint(stage / "policy") == unfinished  # recorded (size and mtime checked), not recomputed
    finally:
        artifacts.content_fingerprint = real
    assert calls == []
    atomic_write_text(stage / "policy" / "weights.bin", "changed behind the manifest's back")
    with pytest.raises(TsalignError, match="changed or damaged"):
        fingerprint(stage / "policy")


def test_a_base_model_is_hashed_once_per_machine_cache_and_again_when_its_files_change(tmp_path, monkeypatch):
    """evaluate keys pi_0's answers by its content: a 16 GB base model read at every evaluate cost a minute."""
    from tsalign.artifacts import store

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    hashed = []
    real = store.content_fingerprint
    monkeypatch.setattr(store, "content_fingerprint", lambda p, **k: hashed.append(p) or real(p, **k))
    cache = tmp_path / "cache"  # the hashes go to <cache>/fingerprints
    first = store.fingerprint(model, cache)
    assert first == real(model) and len(hashed) == 1
    assert store.fingerprint(model, cache) == first and len(hashed) == 1  # remembered: not read again
    assert store.fingerprint(model) == first and len(hashed) == 2  # no cache: read every time
    weights = model / "model.safetensors"
    weights.write_bytes(b"v" * 1000)  # the same size, a later mtime
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = store.fingerprint(model, cache)
    assert second != first and second == real(model) and len(hashed) == 3
    assert store.fingerprint(model, cache) == second and len(hashed) == 3
