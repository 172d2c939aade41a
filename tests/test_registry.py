"""The stage registry (tsalign/stages/registry.py) is the one list of stages: every stage module is in it,
and what reads stages (CLI, config, status, summary, report) takes them from there."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

import tsalign.cli
from tsalign.config.choices import Stage
from tsalign.stages.registry import PIPELINE, REGISTRY, STAGES

STAGE_DEFINITION = re.compile(r"^STAGE = Stage\(\"(\w+)\"", re.M)


def stage_modules() -> dict[str, str]:
    """{stage name: module} of every file under tsalign/stages that defines a stage."""
    found = {}
    for path in (REPO / "tsalign" / "stages").rglob("*.py"):
        match = STAGE_DEFINITION.search(path.read_text())
        if match:
            parts = path.relative_to(REPO).with_suffix("").parts
            found[match.group(1)] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return found


def test_every_stage_module_is_described_by_the_registry():
    assert stage_modules() == {s.name: s.module for s in STAGES}


def test_every_registry_stage_loads_with_its_contract():
    for spec in STAGES:
        stage = spec.load()
        assert stage.name == spec.name and callable(stage.plan) and callable(stage.run) and callable(stage.check)
        assert spec.outputs and all(c.shape in ("value", "interval", "change") for c in spec.summary)


def test_stage_values_config_options_and_commands_agree():
    """`stage=` takes a registry stage or a CLI command; each has its conf/stage option."""
    values = {str(s) for s in Stage}
    assert values == set(REGISTRY) | set(tsalign.cli.COMMANDS)
    assert {p.stem for p in (REPO / "conf" / "stage").glob("*.yaml")} == values
    assert PIPELINE == ("generate", "rank", "distill", "dpo", "evaluate")


def test_the_registry_and_the_views_import_without_torch():
    code = ("import sys; import tsalign.stages.registry, tsalign.views.status, tsalign.views.summary; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def write_manifest(exp: Path, t: int, stage: str, counts: dict) -> None:
    folder = exp / f"iter_{t}" / stage
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "iteration": t, "counts": counts,
                                                      "config": {}, "outputs": {}, "wall_time_s": 1.5}))


def test_pdistill_reaches_status_and_the_summary_by_being_in_the_registry(tmp_path, capsys):
    """Nothing but its registry entry tells status, the loop's summary and the report about pdistill."""
    from tsalign.views.status import experiment_status
    from tsalign.views.summary import iteration_record, summary_table

    exp = tmp_path / "exp"
    write_manifest(exp, 0, "rank", {"pairs": 5, "teacher_calls": 10})
    write_manifest(exp, 0, "pdistill", {"pairs": 5, "steps": 3, "teacher_calls": 7, "first_loss": 1.5,
                                        "last_loss": 1.25})
    rows = {r["stage"]: r for r in experiment_status(exp, None)}
    assert rows["pdistill"]["state"] == "done" and rows["pdistill"]["counts"]["teacher_calls"] == 7
    head, table = summary_table([iteration_record(exp, 0)])
    assert "pdistill_loss" in head and "1.500 -> 1.250" in table[0] and "pairs" in head
    assert "dpo_loss" not in head  # stages that never ran add no columns
