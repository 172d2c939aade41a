"""loop: generate -> rank -> distill -> dpo -> evaluate for every iteration, resumable.

    tsalign stage=loop iterations=3
    tsalign -m stage=loop seed=1,2 dpo.beta=0.05,0.1     # one experiment dir per sweep job

Each stage runs in its own subprocess (so vLLM's GPU memory is freed before training starts) and a
finished stage (matching manifest) is skipped without starting one. Killing the loop at any moment
and rerunning it continues where it stopped: stages write atomically and their manifest last.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from tsalign.algorithms.audit import verdict_line
from tsalign.artifacts.store import ConfigChanged, loop_lock, read_manifest, stage_dir
from tsalign.config.options import accelerate_config_file
from tsalign.errors import TsalignError
from tsalign.pipeline.runner import stage_record
from tsalign.stages.checks import check_loop
from tsalign.stages.lineage import experiment_dir
from tsalign.stages.registry import PIPELINE, spec
from tsalign.views.summary import counts, fmt, iteration_record, summary_table, wall_times

_OWN_KEYS = ("stage", "iteration", "iterations", "experiment_dir", "experiment_name", "redo")


def _die_with_parent() -> None:
    """Child processes get SIGKILL when the loop dies (even by kill -9): no orphan keeps writing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_overrides(task_overrides: list[str]) -> list[str]:
    """The user's overrides minus the ones the loop sets itself per stage."""
    keep = []
    for o in task_overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key not in _OWN_KEYS:
            keep.append(o)
    return keep


def quoted(value: str) -> str:
    """A Hydra override value that may hold '=' or ',' (sweep dirs do: dpo.beta=0.05,seed=1)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def status(cfg: DictConfig, stage: str, t: int) -> str:
    """done | todo | changed (finished under another config or inputs). Unfinished inputs mean todo."""
    sub = cfg.copy()
    sub.iteration, sub.redo = t, False
    try:
        return "done" if stage_record(sub, stage)[2].is_done() else "todo"
    except ConfigChanged:
        if cfg.redo:
            return "changed"  # redo=true replaces exactly the stages whose config or inputs changed
        raise
    except TsalignError:
        if read_manifest(stage_dir(experiment_dir(cfg), t, stage)) is None:
            return "todo"  # upstream not finished yet: the child reports anything else
        raise


def stage_launcher(cfg: DictConfig, stage: str) -> list[str]:
    """The command that starts a stage: `python -m tsalign.cli`, or under `accelerate launch` for the
    training stages when launch.processes > 1 or an accelerate config is named, and for generate when
    launch.generate_processes > 1 (plain `--multi_gpu` processes, one prompt shard and one engine each;
    the training stages' accelerate config is not theirs)."""
    plain = [sys.executable, "-m", "tsalign.cli"]
    accelerate = [sys.executable, "-m", "tsalign.pipeline.launch"]  # accelerate launch, its failures in one line
    launch = cfg.launch
    if stage == "generate":
        if launch.generate_processes <= 1:
            return plain
        return [*accelerate, "--multi_gpu", "--num_processes", str(launch.generate_processes), *plain[1:]]
    if not spec(stage).multi_process or (launch.processes <= 1 and not launch.accelerate_config):
        return plain
    config = ["--config_file", str(accelerate_config_file(launch.accelerate_config))] if launch.accelerate_config \
        else ["--multi_gpu"]  # torchrun-style processes; on a CPU machine they train over gloo
    processes = ["--num_processes", str(launch.processes)] if launch.processes > 1 else []
    return [*accelerate, *config, *processes, *plain[1:]]


def run_loop(cfg: DictConfig, task_overrides: list[str] | None = None) -> None:
    check_loop(cfg)  # K, base model paths and lengths, prompts: before the first stage starts
    with loop_lock(Path(cfg.experiment_dir)):
        run_stages(cfg, child_overrides(task_overrides or []))
    print_summary(Path(cfg.experiment_dir), range(cfg.iteration + cfg.iterations))
    from tsalign.views.report import report_after_run

    report_after_run(Path(cfg.experiment_dir))


def run_stages(cfg: DictConfig, overrides: list[str]) -> None:
    """Each iteration's stages not done yet, each in its own process, in pipeline order."""
    hydra_dir = Path(cfg.experiment_dir) / "_hydra"
    for t in range(cfg.iteration, cfg.iteration + cfg.iterations):
        for stage in PIPELINE:
            state = status(cfg, stage, t)
            if state == "done":
                print(f"[loop] iter_{t}/{stage}: done, skipped")
                continue
            redo = ["redo=true"] if state == "changed" else []
            cmd = [*stage_launcher(cfg, stage), *overrides, *redo, f"stage={stage}", f"iteration={t}",
                   f"experiment_dir={quoted(cfg.experiment_dir)}", f"experiment_name={quoted(cfg.experiment_name)}",
                   f"hydra.run.dir={quoted(f'{hydra_dir}/iter_{t}_{stage}')}"]
            print(f"[loop] iter_{t}/{stage}: starting", flush=True)
            code = subprocess.run(cmd, preexec_fn=_die_with_parent).returncode
            if code != 0:
                raise TsalignError(f"iter_{t}/{stage} failed (exit {code}, its message is above); "
                                   "fix it and rerun the same command: finished stages are kept")


def print_summary(experiment: Path, iterations) -> None:
    records = [iteration_record(experiment, t) for t in iterations]
    head, rows = summary_table(records)
    table = [head, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print(f"\nTS-Align summary: {experiment}")
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("stage wall times (s): " + "; ".join(
        f"iter_{r['iteration']}: " + ", ".join(f"{s} {fmt(w, 1)}" for s, w in wall_times(r).items()) for r in records))
    for r in records:  # the audit's one line where the student's shortlist does no better than random pairs
        line = verdict_line(r["metrics"].get("rank") or {})
        if line:
            print(f"iter_{r['iteration']}: {line}")
    if any(counts(r, "evaluate").get("judge_is_teacher") for r in records):
        print("win rates are judged by the training teacher: fit to the optimised reward, not quality "
              "(evaluate.judge=<conf/teacher option> for an independent judge)")
    plots = sorted(experiment.glob("iter_*/evaluate/progress.png"))
    if plots:
        print(f"plot: {plots[-1]}")
