"""The one reader of a finished experiment's manifests for the loop's summary, the report and the plots, and
the one formatter of their figures: every stage of tsalign.stages.registry contributes its summary columns,
so a new stage shows up here by being described there.
"""

from __future__ import annotations

import json
from pathlib import Path

from tsalign.artifacts.store import damaged_outputs, read_manifest, stage_dir
from tsalign.stages.registry import REGISTRY, STAGES, Column


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def iterations(experiment: Path) -> list[int]:
    found = [p.name.split("_", 1)[1] for p in experiment.glob("iter_*") if p.is_dir()]
    return sorted(int(t) for t in found if t.isdigit())


def iteration_record(experiment: Path, t: int) -> dict:
    """Manifests (None: not finished) and metrics.json of iteration t's stages, every registry stage."""
    manifests = {s.name: read_manifest(stage_dir(experiment, t, s.name)) for s in STAGES}
    metrics = {name: read_json(stage_dir(experiment, t, name) / "metrics.json") if m else {}
               for name, m in manifests.items()}
    return {"iteration": t, "manifests": manifests, "metrics": metrics}


def problems(experiment: Path, records: list[dict]) -> list[str]:
    """What a summary of these records leaves out or cannot vouch for, one line each: an iteration folder
    missing between finished ones, and finished stages whose outputs were deleted or changed since."""
    found = [r["iteration"] for r in records]
    lines = [f"iter_{t} is missing (deleted?): its figures are not shown; rerun `tsalign stage=loop` to redo it"
             for t in range(max(found, default=-1)) if t not in found]
    for r in records:
        for name, manifest in r["manifests"].items():
            damaged = damaged_outputs(stage_dir(experiment, r["iteration"], name), manifest) if manifest else []
            if damaged:
                lines.append(f"iter_{r['iteration']}/{name}: {', '.join(damaged)} since it finished; its figures "
                             f"come from its manifest: `tsalign stage={name} iteration={r['iteration']} redo=true`")
    return lines


def counts(record: dict, stage: str) -> dict:
    return (record["manifests"].get(stage) or {}).get("counts") or {}


def figure(record: dict, stage: str, key: str):
    """A value from the stage's metrics.json, else from its manifest's counts."""
    value = record["metrics"].get(stage, {}).get(key)
    return counts(record, stage).get(key) if value is None else value


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def cell(column: Column, values: list) -> str:
    """A column's values as text: `v`, `v [low, high]` or `before -> after`."""
    if all(v is None for v in values):
        return "-"
    if column.shape == "interval":
        return f"{fmt(values[0])} [{fmt(values[1], 2)}, {fmt(values[2], 2)}]"
    if column.shape == "change":
        return " -> ".join(fmt(v) for v in values)
    return fmt(values[0])


def columns(records: list[dict]) -> list[tuple[str, Column]]:
    """(stage, column) of every stage that finished in at least one of the records, in registry order."""
    ran = {name for r in records for name, m in r["manifests"].items() if m}
    return [(s.name, c) for s in STAGES if s.name in ran for c in s.summary]


def summary_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of the summary: one row per iteration, the registry's columns of the stages that ran."""
    shown = columns(records)
    head = ["iter", *(c.label for _, c in shown)]
    rows = [[str(r["iteration"]), *(cell(c, [figure(r, stage, k) for k in c.keys]) for stage, c in shown)]
            for r in records]
    return head, rows


def wall_times(record: dict) -> dict[str, float | None]:
    return {name: (m or {}).get("wall_time_s") for name, m in record["manifests"].items()
            if m or REGISTRY[name].in_loop}
