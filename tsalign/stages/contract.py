"""The stage contract: what a stage declares, what the runner hands it, what it gives back.

A stage is a module that ends with `STAGE = Stage(name, plan, run, check)`, described in
tsalign.stages.registry:

    plan(cfg) -> Plan              cheap, loads no model: the config slice and the input files the
                                   stage's outputs depend on (everything it reads, so a change reruns it)
    check(cfg) -> None             loads no model: paths, roles, lengths, sizes; a TsalignError names the key
    run(ctx: StageContext) -> StageResult
                                   does the work in ctx.directory, reading only ctx.inputs and ctx.cfg

The runner (tsalign.pipeline.runner) builds the plan once, decides skip / run, hands the stage its record
(StageContext: config slice, verified inputs, the stamp that resumable partial work is bound to, the
tracker), and writes the manifest from the StageResult last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf


class Tracker(Protocol):
    """What a stage may do with the run's tracker (tsalign.views.tracking: wandb, or nothing)."""

    report_to: list[str]  # for TRL / transformers Trainers: ["wandb"] or []

    def log(self, metrics: dict, step: int | None = None) -> None: ...

    def table(self, name: str, rows: list[dict]) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What a stage's outputs depend on: a config slice (hashed) and input paths (fingerprinted)."""

    config: dict
    inputs: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """The stage record the runner hands a stage's `run`."""

    cfg: DictConfig
    iteration: int
    directory: Path  # where outputs go (the stage dir, or its staging dir during a redo)
    plan: Plan
    stamp: dict  # config + input hashes: what resumable partial work in directory/_work is bound to
    tracker: Tracker

    @property
    def inputs(self) -> dict[str, Path]:
        return self.plan.inputs


@dataclass(frozen=True)
class StageResult:
    """What a stage gives back: counts (summary numbers), output paths inside ctx.directory, and
    anything else worth keeping in the manifest."""

    counts: dict[str, Any]
    outputs: dict[str, Path]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    plan: Callable[[DictConfig], Plan]
    run: Callable[[StageContext], StageResult]
    check: Callable[[DictConfig], None]  # refuses bad settings in one line before anything loads or is written


def section(cfg: DictConfig, *keys: str) -> dict:
    """Plain values of top-level config keys, for a plan's config slice."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k] for k in keys}
