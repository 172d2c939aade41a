"""Runs one stage of one iteration: skip it when its manifest matches, else run it and write the
manifest last. The stage lifecycle (the stages themselves are described in tsalign.stages.registry):

    record  = stage_record(cfg, name)          plan -> StageRun (config slice + inputs; nothing loaded)
    is_done -> skip                             matching manifest, outputs verified intact
    check_stage                                 stage.check + memory fit: no model loaded, nothing written
    begin   -> StageContext -> stage.run(ctx)  -> StageResult -> finish (manifest written last)
"""

from __future__ import annotations

import contextlib
import time

from omegaconf import DictConfig, OmegaConf

from tsalign import distributed
from tsalign.artifacts.store import StageRun, read_manifest, stage_dir, stage_lock
from tsalign.errors import TsalignError
from tsalign.progress import say
from tsalign.stages.checks import check_stage
from tsalign.stages.contract import Plan, Stage, StageContext
from tsalign.stages.lineage import experiment_dir
from tsalign.stages.registry import MULTI_PROCESS, spec
from tsalign.views.tracking import Tracker, start_tracker


def stage_record(cfg: DictConfig, name: str) -> tuple[Stage, Plan, StageRun]:
    """The stage, its plan and its run record (directory, config slice, inputs) at cfg.iteration."""
    stage = spec(name).load()
    plan = stage.plan(cfg)
    t = cfg.iteration
    run = StageRun(stage_dir(experiment_dir(cfg), t, name), name, t, {"iteration": t, **plan.config}, plan.inputs,
                   cfg.redo)
    return stage, plan, run


def run_stage(cfg: DictConfig, name: str) -> dict:
    """Skip if done; else run the stage, write its manifest last, and track it. Returns the manifest.
    Under `accelerate launch` (tsalign.distributed) every process runs the stage and the main one
    alone holds the lock, writes the manifest and the tracker run."""
    stage, plan, run = stage_record(cfg, name)
    if distributed.launched() and not spec(name).multi_process:
        raise TsalignError(f"stage={name} runs in one process; launch only {' / '.join(MULTI_PROCESS)} with accelerate")
    main = distributed.is_main()
    with stage_lock(run.directory) if main else contextlib.nullcontext():
        if distributed.from_main(run.is_done):
            say(f"[tsalign] iter_{cfg.iteration}/{name}: done already (manifest matches), skipped")
            return read_manifest(run.directory)
        check_stage(cfg, stage)  # before anything is written or loaded: a bad path or length is one line
        tracker = start_tracker(cfg.logger.backend, cfg.logger.project, cfg.experiment_name, name, cfg.iteration,
                                OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                                experiment_dir(cfg) / "wandb", cfg.logger.mode, cfg.logger.entity) \
            if main else Tracker()
        t0 = time.time()
        try:
            work = distributed.from_main(run.begin)
            ctx = StageContext(cfg=cfg, iteration=cfg.iteration, directory=work, plan=plan, stamp=run.stamp(),
                               tracker=tracker)
            result = stage.run(ctx)
            distributed.barrier()  # every process has finished writing its share of the outputs
            if main:
                manifest = run.finish(result.counts, result.outputs, result.extra)
                tracker.summary(result.counts)
        finally:
            with contextlib.suppress(Exception):  # tracking trouble never costs finished work
                tracker.finish()
    distributed.barrier()  # the manifest is written before any process reads it
    if not main:
        return read_manifest(run.directory)
    say(f"[tsalign] iter_{cfg.iteration}/{name}: finished in {time.time() - t0:.1f}s -> {run.directory}")
    if name == "evaluate":  # the report reads finished stages: after the manifest is written
        from tsalign.views.report import report_after_run

        report_after_run(experiment_dir(cfg))
    return manifest
