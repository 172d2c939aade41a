"""The persisted format (tsalign/artifacts/FORMAT.md) against its v1 snapshot (tsalign/artifacts/format_v1.json):
every stage's hashed config keys (composed on the tiny models), its outputs and `_work` names, the manifest's
fields; and that a stage finished before config hashes ignored new default-valued keys is still done."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import stage_config

import tsalign.artifacts.format as artifact_format
from tsalign.artifacts.format import config_paths, format_v1, hashed_config
from tsalign.artifacts.store import MANIFEST, ConfigChanged, StageRun, fingerprint, stage_dir
from tsalign.stages.registry import STAGES

# the runtime reads this very file: the test and `is_done` agree on what v1 is
SNAPSHOT = Path(artifact_format.__file__).with_name(artifact_format.FORMAT_FILE)

# Overrides that reach every key a stage's slice can hold: some keys appear only under some settings
VARIANTS = {
    "generate": [[]],
    "rank": [[]],
    "distill": [[], ["teacher.fit.data=llamafactory_dpo"]],  # the teacher's hold-out report puts `teacher` in
    "dpo": [[]],
    "evaluate": [[], ["evaluate.policy_from=pdistill"]],
    "pdistill": [["pdistill.loss=dckd"], ["pdistill.loss=adpa_dckd"]],  # ADPA adds the reference and `greedy`
}

# manifest fields added after v1 (every reader copes with their absence from older manifests)
MANIFEST_FIELDS_SINCE_V1: tuple[str, ...] = ()
# `_work` names added since v1, per stage (FORMAT.md: adding one is safe, a v1 resume simply lacks it)
WORK_SINCE_V1: dict[str, list[str]] = {"rank": ["audit.partial.jsonl"]}

RULE = ("Finished experiments on users' disks are recognised as done by these keys (tsalign/artifacts/FORMAT.md, "
        "'Changing the format'). Do not edit format_v1.json to make this pass.")
ADDED = ("{where} would hash new key(s) {keys}: every finished experiment would report 'changed'. Give each a "
         "default in tsalign/config/schema.py that reproduces the behaviour before it, and leave conf/ at that "
         "default: a key outside format_v1.json is left out of the hash while it has its default. A key the plan "
         "adds itself (not a schema key) has no default: add it only where it differs from what v1 did. " + RULE)
REMOVED = ("{where} no longer has key(s) {keys}: every finished experiment records them, so each would report "
           "'changed'. Keep the key (a rename: keep the old one and add the new one with a default), or make a "
           "format v2 (new snapshot, a note in NOTES.md that finished stages need redo=true). " + RULE)


def old_config_hash(config: dict) -> str:
    """config_hash as it was before new default-valued keys were left out: every key of the slice."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_finished(exp: Path, t: int, stage: str, outputs: dict[str, str]) -> None:
    """A hand-made finished upstream stage: its output files and a manifest naming none of them (not verified)."""
    d = stage_dir(exp, t, stage)
    for rel, text in outputs.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    (d / MANIFEST).write_text(json.dumps({"stage": stage, "iteration": t}))


@pytest.fixture
def upstream(tmp_path) -> Path:
    """iter_0 finished up to dpo and pdistill: what every stage's plan reads."""
    outputs = tmp_path / "outputs"
    exp = Path(stage_config(outputs).experiment_dir)
    write_finished(exp, 0, "generate", {"candidates.jsonl": '{"prompt_id": "p0"}\n'})
    write_finished(exp, 0, "rank", {"pairs.jsonl": '{"prompt": "p"}\n'})
    write_finished(exp, 0, "distill", {"student/config.json": "{}"})
    write_finished(exp, 0, "dpo", {"policy/config.json": "{}"})
    write_finished(exp, 0, "pdistill", {"policy/config.json": "{}"})
    return outputs


def stage_run(outputs: Path, stage: str, overrides: list[str]) -> StageRun:
    """The record the runner makes: the plan's slice with its iteration, the plan's inputs."""
    from tsalign.pipeline.runner import stage_record

    return stage_record(stage_config(outputs, [f"stage={stage}", *overrides]), stage)[2]


def current_keys(outputs: Path, stage: str, hashed: bool = True) -> set[str]:
    """Every key the stage's hashed config can hold, over its variants."""
    keys: set[str] = set()
    for overrides in VARIANTS[stage]:
        config = stage_run(outputs, stage, overrides).config
        keys |= set(config_paths(hashed_config(stage, config) if hashed else config))
    return keys


def test_every_stage_is_in_the_snapshot():
    assert sorted(VARIANTS) == sorted(s.name for s in STAGES) == sorted(format_v1()["stages"])


@pytest.mark.parametrize("stage", list(VARIANTS))
def test_the_hashed_config_keys_are_the_v1_keys(upstream, stage):
    now, v1 = current_keys(upstream, stage), set(format_v1()["stages"][stage]["config"])
    where = f"stage {stage}'s config slice (tsalign.stages.{stage}.plan)"
    assert not now - v1, ADDED.format(where=where, keys=sorted(now - v1))
    assert not v1 - now, REMOVED.format(where=where, keys=sorted(v1 - now))


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_outputs_and_work_names_are_the_v1_names(spec):
    v1 = format_v1()["stages"][spec.name]
    names = {"outputs": list(spec.outputs), "work": list(spec.work)}
    assert names == {"outputs": v1["outputs"], "work": v1["work"] + WORK_SINCE_V1.get(spec.name, [])}, (
        f"stage {spec.name}'s outputs or _work names changed (tsalign/stages/registry.py): finished experiments "
        "hold the old names, downstream stages and resumes read them. Keep the old names, or make a format v2. "
        + RULE)


def test_the_manifest_fields_are_the_v1_fields(tmp_path):
    run = StageRun(stage_dir(tmp_path, 0, "rank"), "rank", 0, {"seed": 1})
    run.begin()
    fields = list(run.finish({}, {}))
    assert fields == format_v1()["manifest"] + list(MANIFEST_FIELDS_SINCE_V1), (
        "StageRun.finish writes other top-level manifest fields than format v1 (+ MANIFEST_FIELDS_SINCE_V1): "
        "is_done, verify_output, status and the report read them from finished experiments. A new field is fine "
        "when every reader copes with its absence from older manifests: list it in MANIFEST_FIELDS_SINCE_V1. Never "
        "rename or remove one without a format v2. " + RULE)


def v1_view(config: dict, v1: frozenset[str], prefix: str = "") -> dict:
    """`config` less the schema keys added since v1 (free-form values below a kept key stay whole)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in v1 or any(k.startswith(f"{path}.") for k in v1):
            out[key] = v1_view(value, v1, f"{path}.") if isinstance(value, dict) and any(
                k.startswith(f"{path}.") for k in v1) else value
    return out


@pytest.mark.parametrize("stage", list(VARIANTS))
def test_a_stage_finished_before_new_keys_were_left_out_is_still_done(upstream, stage):
    """The manifest as StageRun.finish wrote it before this change (config whole, its hash over every key) is
    recognised as done, and a stage finished now records the same hash."""
    run = stage_run(upstream, stage, VARIANTS[stage][-1])
    run.config = v1_view(run.config, artifact_format.v1_keys(stage))  # what a v1 plan gave: no option added since
    before = {"stage": stage, "iteration": run.iteration, "config_hash": old_config_hash(run.config),
              "config": run.config, "outputs": {},
              "inputs": {k: {"path": str(p), "sha256": fingerprint(p)} for k, p in run.inputs.items()}}
    run.directory.mkdir(parents=True, exist_ok=True)  # upstream stages already have one (hand-made)
    (run.directory / MANIFEST).write_text(json.dumps(before, indent=2, default=str))
    assert run.is_done()
    assert run.stamp()["config"] == run.config  # resumable _work made before the change stays valid too
    run.redo = True
    run.begin()
    assert run.finish({}, {})["config_hash"] == old_config_hash(run.config)


def test_an_option_added_with_its_default_leaves_finished_stages_done(upstream, monkeypatch):
    """dpo.dual_clip as if it were added after v1: a dpo finished before it existed stays done while the option
    keeps its default, and is "changed" once it is set to another value."""
    v1_without = artifact_format.v1_keys("dpo") - {"dpo.dual_clip"}
    monkeypatch.setattr(artifact_format, "v1_keys", lambda stage: v1_without)
    run = stage_run(upstream, "dpo", [])
    made_before = {**run.config, "dpo": {k: v for k, v in run.config["dpo"].items() if k != "dual_clip"}}
    assert run.hashed == made_before and run.stamp()["config"] == made_before
    run.begin()
    run.config = made_before  # what StageRun.finish recorded before the option existed
    assert run.finish({}, {})["config_hash"] == old_config_hash(made_before)

    assert stage_run(upstream, "dpo", []).is_done()
    clipped = stage_run(upstream, "dpo", ["dpo.dual_clip=[-1.0,1.0]"])
    assert clipped.hashed["dpo"]["dual_clip"] == [-1.0, 1.0]
    with pytest.raises(ConfigChanged, match=r"changed: dpo\.dual_clip\)"):
        clipped.is_done()
