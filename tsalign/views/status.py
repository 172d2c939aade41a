"""Where an experiment stands: per iteration and stage, done / partial (how far) / not started, and
the command to run next. Reads manifests, `_work/` and the saved Hydra configs only: no model, no
torch, so it answers in well under a second even while a stage is running.

    python -m tsalign.views.status outputs/default          # (the CLI will expose it as a stage value)

States: "done" (manifest present), "partial" (stage folder without manifest: resume state in
`_work/` says how far), "redo" (a finished stage is being redone in iter_<t>/.<stage>.redo),
"damaged" (manifest present, but an output it records was deleted or changed since: redo it), "not started".
A partial stage is "running" when a process holds its stage lock, else "stopped".
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from pathlib import Path

from tsalign.artifacts.store import LOOP_LOCK, MANIFEST, damaged_outputs, read_manifest, stage_dir
from tsalign.stages.registry import STAGES, spec

SCORE_CHUNK = 64  # tsalign.engines.scoring.resumable.SCORE_CHUNK; copied so that no scoring module is imported

_OWN_KEYS = ("stage", "iteration", "iterations", "experiment_dir", "experiment_name", "redo", "paths.outputs")


# ---------------------------------------------------------------- small readers


def complete_lines(path: Path) -> int:
    """Rows of an append-only JSONL (PartialRows): lines ending in a newline; a torn tail does not count."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def lock_held(lock: Path) -> bool:
    """True when a process holds the stage lock (tsalign.artifacts.store.stage_lock). Probed with a shared
    non-blocking flock on a read-only descriptor: nothing is written, the probe is released at once."""
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases our probe
    return False


def saved_hydra_dir(experiment: Path, iteration: int, stage: str) -> Path | None:
    """The .hydra folder stage=loop gave this stage's child process, else the newest one of the experiment."""
    own = experiment / "_hydra" / f"iter_{iteration}_{stage}" / ".hydra"
    if (own / "config.yaml").is_file():
        return own
    found = sorted(experiment.glob("_hydra/*/.hydra/config.yaml"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def _load_yaml(path: Path):
    import yaml  # PyYAML, which Hydra and OmegaConf install

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def planned_data(experiment: Path, iteration: int, stage: str) -> dict | None:
    """The `data` config section this stage runs (or ran) with: from its saved Hydra config, else from
    a finished sibling stage's manifest (generate and evaluate record `data`)."""
    hydra = saved_hydra_dir(experiment, iteration, stage)
    cfg = _load_yaml(hydra / "config.yaml") if hydra else None
    if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict):
        return cfg["data"]
    for sibling in sorted(experiment.glob(f"iter_*/*/{MANIFEST}")):
        data = (json.loads(sibling.read_text()).get("config") or {}).get("data")
        if isinstance(data, dict):
            return data
    return None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def planned_prompts(experiment: Path, iteration: int) -> int | None:
    """Prompts in iteration t's training shard as configured (the pool may hold fewer)."""
    data = planned_data(experiment, iteration, "generate") or {}
    per_iter, cap = _int(data.get("prompts_per_iteration")), _int(data.get("max_prompts"))
    return min(per_iter, cap) if per_iter and cap else per_iter


def planned_eval_prompts(experiment: Path, iteration: int) -> int | None:
    """Held-out prompts evaluate answers: a finished evaluate's n, else data.eval_prompts."""
    for m in sorted(experiment.glob(f"iter_*/evaluate/{MANIFEST}")):
        n = _int(json.loads(m.read_text()).get("counts", {}).get("n"))
        if n:
            return n
    return _int((planned_data(experiment, iteration, "evaluate") or {}).get("eval_prompts"))


def _of(done: int, total: int | None) -> str:
    return f"{done} of {total}" if total is not None else f"{done} (total not known yet)"


# ---------------------------------------------------------------- how far a partial stage got


def generate_progress(experiment: Path, t: int, work: Path) -> dict:
    # one file, or one per shard under `accelerate launch` (candidates.shard<r>of<N>.partial.jsonl)
    done = sum(complete_lines(f) for f in (work / "_work").glob("candidates*.partial.jsonl"))
    total = planned_prompts(experiment, t)
    return {"done": done, "total": total, "unit": "prompts",
            "detail": f"{_of(done, total)} prompts sampled (_work/candidates*.partial.jsonl)"}


def rank_progress(experiment: Path, t: int, work: Path) -> dict:
    generated = read_manifest(stage_dir(experiment, t, "generate"))
    total = _int((generated or {}).get("counts", {}).get("prompts"))
    student = complete_lines(work / "_work" / "student.partial.jsonl")
    teacher = complete_lines(work / "_work" / "teacher.partial.jsonl")
    chunks = None if total is None else math.ceil(total / SCORE_CHUNK)
    # the teacher is asked only about prompts with a shortlist (two distinct candidates): at most `total`
    detail = (f"student scored {_of(student, total)} prompts ({_of(math.ceil(student / SCORE_CHUNK), chunks)} "
              f"chunks of {SCORE_CHUNK}); teacher {teacher} of at most {total if total is not None else '?'} "
              f"prompts ({math.ceil(teacher / SCORE_CHUNK)} chunks) (_work/student.partial.jsonl, "
              "_work/teacher.partial.jsonl)")
    return {"done": student, "total": total, "unit": "prompts", "student": student, "teacher": teacher,
            "detail": detail}


def distill_progress(experiment: Path, t: int, work: Path) -> dict:
    return {"done": None, "total": None, "unit": None,
            "detail": "started; distill keeps no resume state (a rerun starts it over, seconds to minutes)"}


def last_checkpoint(checkpoints: Path) -> tuple[int, int | None] | None:
    """(global_step, max_steps) of the newest step checkpoint whose trainer_state.json is readable
    (Trainer writes it last: without it the save was cut by a crash and dpo ignores it too)."""
    found = []
    for d in checkpoints.glob("checkpoint-*"):
        try:
            state = json.loads((d / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append((_int(state.get("global_step")) or 0, _int(state.get("max_steps"))))
    return max(found) if found else None


def dpo_progress(experiment: Path, t: int, work: Path) -> dict:
    last = last_checkpoint(work / "_work" / "checkpoints")
    if last is None:
        return {"done": 0, "total": None, "unit": "steps", "detail": "no step checkpoint yet (_work/checkpoints)"}
    step, max_steps = last
    return {"done": step, "total": max_steps, "unit": "steps",
            "detail": f"step {_of(step, max_steps)} saved (_work/checkpoints/checkpoint-{step})"}


def newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def evaluate_progress(experiment: Path, t: int, work: Path) -> dict:
    total = planned_eval_prompts(experiment, t)
    policy = complete_lines(work / "_work" / "policy_answers.jsonl")
    parts = [f"pi_{t + 1} answered {_of(policy, total)} (_work/policy_answers.jsonl)"]
    done = policy
    for role in ("base", "control"):  # shared by the iterations: the newest cache is this config's
        cache = newest(list((experiment / "_eval_answers").glob(f"{role}-*.jsonl")))
        if cache is not None:
            rows = complete_lines(cache)
            done += rows
            parts.append(f"{'pi_0' if role == 'base' else 'control'} {_of(rows, total)} (_eval_answers/{cache.name})")
    if total is not None and policy >= total:
        parts.append("all answers in: judging")
    return {"done": done, "total": None, "unit": "answers", "policy_answers": policy, "prompts": total,
            "detail": "; ".join(parts)}


def started_progress(stage: str) -> dict:
    """A stage with no progress reader of its own: what it keeps in _work (tsalign.stages.registry)."""
    work = ", ".join(f"_work/{w}" for w in spec(stage).work) or "none"
    return {"done": None, "total": None, "unit": None, "detail": f"started; resume state: {work}"}


# how far a partial stage got, per stage that keeps resume state worth counting
PROGRESS = {"generate": generate_progress, "rank": rank_progress, "distill": distill_progress,
            "dpo": dpo_progress, "evaluate": evaluate_progress}


def partial_progress(experiment: Path, t: int, stage: str, work: Path) -> dict:
    if not any(work.iterdir()):
        return {"done": 0, "total": None, "unit": None, "detail": "started, nothing saved yet (loading models?)"}
    progress = PROGRESS[stage](experiment, t, work) if stage in PROGRESS else started_progress(stage)
    final = spec(stage).outputs[0]
    if (work / final).exists():  # the manifest is written last, right after the outputs
        progress["detail"] += f"; {final} written, manifest not yet"
    return progress


# ---------------------------------------------------------------- the view


def stage_status(experiment: Path, t: int, stage: str) -> dict:
    directory = stage_dir(experiment, t, stage)
    staging = directory.with_name(f".{directory.name}.redo")
    running = lock_held(directory.with_name(f".{directory.name}.lock"))
    row = {"iteration": t, "stage": stage, "running": running}
    manifest = read_manifest(directory)
    if manifest is not None:
        counts = manifest.get("counts", {})
        row.update(state="done", wall_time_s=manifest.get("wall_time_s"), started_at=manifest.get("started_at"),
                   counts={k: counts[k] for k in spec(stage).status_counts if k in counts})
        if staging.is_dir():  # begin() works here only when a finished stage is redone
            row.update(state="redo", progress=partial_progress(experiment, t, stage, staging))
        elif damaged := damaged_outputs(directory, manifest):  # a later stage would refuse it: say so now
            row.update(state="damaged", damaged=damaged)
        return row
    if directory.is_dir():  # begin() made it: a first run started (or crashed) here
        return {**row, "state": "partial", "progress": partial_progress(experiment, t, stage, directory)}
    return {**row, "state": "not started"}


def found_iterations(experiment: Path) -> list[int]:
    its = [int(p.name.split("_", 1)[1]) for p in experiment.glob("iter_*") if p.name.split("_", 1)[1].isdigit()]
    return sorted(its) or [0]


def experiment_status(experiment_dir: Path, iterations: int | None) -> list[dict]:
    """One row per (iteration, stage) in pipeline order: iterations 0..iterations-1 (the planned run)
    and every iteration on disk besides; None: those on disk only."""
    experiment = Path(experiment_dir)
    its = found_iterations(experiment)
    if iterations is not None:
        its = list(range(max(iterations, its[-1] + 1 if any(experiment.glob("iter_*")) else 0)))
    # the loop's stages always; others (pdistill) where they ran
    return [stage_status(experiment, t, s.name) for t in its for s in STAGES
            if s.in_loop or stage_dir(experiment, t, s.name).is_dir()]


# ---------------------------------------------------------------- what to run next


def saved_overrides(experiment: Path) -> list[str]:
    """The user's overrides of the newest stage=loop child (its .hydra/overrides.yaml), minus the ones
    that place the run (stage, iteration, experiment, hydra.*): a rerun needs the same config."""
    found = sorted(experiment.glob("_hydra/*/.hydra/overrides.yaml"), key=lambda p: p.stat().st_mtime)
    saved = _load_yaml(found[-1]) if found else None
    if not isinstance(saved, list):
        return []
    return [o for o in map(str, saved)
            if o.lstrip("+~").split("=", 1)[0] not in _OWN_KEYS and not o.lstrip("+~").startswith("hydra.")]


def experiment_args(experiment: Path) -> list[str]:
    """The overrides that name this experiment from the current folder."""
    experiment = experiment.resolve()
    if "=" in experiment.name or "," in experiment.name:  # a sweep job's folder: name it whole
        return [f"\"experiment_dir='{experiment}'\""]
    if experiment.parent == Path("outputs").resolve():
        return [f"experiment_name={experiment.name}"]
    return [f"paths.outputs={experiment.parent}", f"experiment_name={experiment.name}"]


def next_commands(experiment_dir: Path, rows: list[dict]) -> list[str]:
    """The command for the first stage not done (in pipeline order), and the loop that finishes the lot."""
    experiment = Path(experiment_dir)
    tail = [*saved_overrides(experiment), *experiment_args(experiment)]
    total = max(r["iteration"] for r in rows) + 1
    todo = next((r for r in rows if r["state"] != "done"), None)
    if todo is None:
        return [" ".join(["tsalign", "stage=loop", f"iterations={total + 1}", *tail]) + "   # one more iteration"]
    if todo["running"]:
        return [f"(iter_{todo['iteration']}/{todo['stage']} is running now: wait for it)"]
    if lock_held(experiment / LOOP_LOCK):  # between two stages of a running loop, no stage lock is held
        return [f"(a stage=loop is running this experiment: iter_{todo['iteration']}/{todo['stage']} is next; "
                "wait for it)"]
    redo = ["redo=true"] if todo["state"] in ("redo", "damaged") else []
    return [" ".join(["tsalign", f"stage={todo['stage']}", f"iteration={todo['iteration']}", *redo, *tail]),
            " ".join(["tsalign", "stage=loop", f"iterations={total}", *tail]) + "   # or everything left"]


# ---------------------------------------------------------------- printing


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def describe(row: dict) -> str:
    state = row["state"]
    if state == "done":
        counts = ", ".join(f"{k} {_fmt(v)}" for k, v in row.get("counts", {}).items())
        return f"done in {_fmt(row.get('wall_time_s'))} s: {counts}"
    if state == "not started":
        return "not started"
    if state == "damaged":
        return f"DAMAGED: finished, but {', '.join(row['damaged'])} since; redo it (redo=true)"
    now = "running" if row["running"] else "stopped"
    what = "redo in progress (the finished outputs stay until it ends)" if state == "redo" else "partial"
    return f"{what}, {now}: {row['progress']['detail']}"


def format_status(experiment_dir: Path, rows: list[dict]) -> str:
    lines = [f"TS-Align status: {Path(experiment_dir)}"]
    for t in sorted({r["iteration"] for r in rows}):
        lines.append(f"iter_{t}")
        lines += [f"  {r['stage']:<9} {describe(r)}" for r in rows if r["iteration"] == t]
    lines.append("next:")
    lines += [f"  {c}" for c in next_commands(experiment_dir, rows)]
    return "\n".join(lines)


def main(experiment_dir: Path, iterations: int | None = None) -> None:
    """Print the status view of one experiment."""
    experiment = Path(experiment_dir)
    if not experiment.is_dir():
        print(f"no experiment at {experiment} (nothing has run under this experiment_name yet)")
        return
    jobs = [] if any(experiment.glob("iter_*")) else sorted(
        p.parent for p in experiment.glob("*/iter_*") if not p.parent.name.startswith(("_", ".")) and p.is_dir())
    for job in dict.fromkeys(jobs):  # a sweep (`tsalign -m ...`): one experiment per job folder
        main(job, iterations)
        print()
    if jobs:
        return
    print(format_status(experiment_dir, experiment_status(Path(experiment_dir), iterations)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/default"))
