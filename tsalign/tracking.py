"""Experiment tracking: wandb (offline unless told) or nothing. One run per (iteration, stage)."""

from __future__ import annotations

import os
from pathlib import Path

from tsalign.choices import LoggerBackend
from tsalign.errors import TsalignError

WANDB_MODES = ("offline", "online", "disabled", "shared")


class Tracker:
    """No-op tracker (logger=none); the wandb one below has the same methods."""

    report_to: list[str] = []

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def table(self, name: str, rows: list[dict]) -> None:
        """Sample rows (pairs, evaluation answers) as one table; columns are the first row's keys."""

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    report_to = ["wandb"]  # TRL trainers log into the active run

    def __init__(self, project: str, group: str, name: str, config: dict, directory: Path, mode: str | None,
                 entity: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        directory.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        mode = wandb_mode(mode)
        try:
            self.run = wandb.init(project=project, entity=entity, group=group, name=name,
                                  job_type=name.split("/")[-1], config=config, dir=str(directory), mode=mode,
                                  reinit="finish_previous")
        except Exception as e:  # noqa: BLE001 -- wandb's UsageError, CommError, ValidationError ...: one line
            raise TsalignError(wandb_failure(e, mode)) from None

    def log(self, metrics: dict, step: int | None = None) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log(flat, step=step)

    def table(self, name: str, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            self.run.log({name: self._wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns]
                                                                         for r in rows])})

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self._wandb.finish()


def wandb_mode(mode: str | None) -> str:
    """logger.mode, else WANDB_MODE, else offline; a value wandb would reject is a one-line error here.
    (wandb reads WANDB_MODE itself even when a mode is passed, so a bad one fails even then.)"""
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in WANDB_MODES + ("dryrun", "run"):
        raise TsalignError(f"the environment variable WANDB_MODE={env!r} is not a wandb mode ({', '.join(WANDB_MODES)}); "
                           "unset it (`unset WANDB_MODE`: logger=wandb then runs offline) or set it to one of those")
    mode = mode or env or "offline"
    if mode not in WANDB_MODES + ("dryrun", "run"):
        raise TsalignError(f"logger.mode={mode} is not a wandb mode; use one of: {', '.join(WANDB_MODES)}")
    return mode


def wandb_failure(error: Exception, mode: str) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if mode == "online" and "api key" in first.lower():
        return (f"logger=wandb logger.mode=online needs a W&B API key ({first}); run `wandb login` or set "
                "WANDB_API_KEY, or log offline (logger.mode=offline) and `wandb sync` later")
    return f"wandb could not start a run in mode {mode} ({first}); check logger.* and WANDB_* settings, or use logger=none"


def check_tracker(backend: str, mode: str | None) -> None:
    """What can be checked before a stage starts: the wandb mode (the API key only wandb.init knows)."""
    if LoggerBackend(backend) is LoggerBackend.wandb:
        wandb_mode(mode)


def start_tracker(backend: str, project: str, experiment: str, stage: str, iteration: int, config: dict,
                  experiment_dir: Path, mode: str | None = None, entity: str | None = None) -> Tracker:
    if LoggerBackend(backend) is LoggerBackend.none:
        return Tracker()
    return WandbTracker(project, experiment, f"iter_{iteration}/{stage}", config, Path(experiment_dir), mode, entity)
