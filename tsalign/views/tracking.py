"""Experiment tracking: wandb (offline unless told) or nothing. One run per (iteration, stage)."""

from __future__ import annotations

import os
from pathlib import Path

from tsalign.config.choices import LoggerBackend, WandbMode
from tsalign.errors import TsalignError

LEGACY_ENV_MODES = ("dryrun", "run")  # wandb still reads these from WANDB_MODE: dryrun = offline, run = online


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
                 entity: str | None = None, iteration: int = 0):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        directory.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.iteration, self._on_iteration_axis = iteration, set()
        mode = wandb_mode(mode)
        stage = name.split("/")[-1]
        try:
            self.run = wandb.init(project=project, entity=entity, group=group, name=name, job_type=stage,
                                  tags=[stage, f"iter_{iteration}"], config=config, dir=str(directory), mode=mode,
                                  reinit="finish_previous")
            self.run.define_metric("iteration")
        except Exception as e:  # noqa: BLE001 -- wandb's UsageError, CommError, ValidationError ...: one line
            raise TsalignError(wandb_failure(e, mode)) from None

    def log(self, metrics: dict, step: int | None = None) -> None:
        """Every row carries the iteration. A stage's end-of-stage metrics (no step) are plotted against it,
        so a run group's dashboard draws each metric across iterations; step-wise ones keep their step."""
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if step is None:
            for key in flat.keys() - self._on_iteration_axis:
                self.run.define_metric(key, step_metric="iteration")
            self._on_iteration_axis |= flat.keys()
        self.run.log({**flat, "iteration": self.iteration}, step=step)

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
    """logger.mode, else WANDB_MODE, else offline. logger.mode is a WandbMode (Hydra refuses any other value at
    compose time); WANDB_MODE is checked here, as wandb reads it itself even when a mode is passed."""
    env = os.environ.get("WANDB_MODE")
    if env is not None and env not in (*WandbMode, *LEGACY_ENV_MODES):
        raise TsalignError(f"the environment variable WANDB_MODE={env!r} is not a wandb mode ({', '.join(WandbMode)}); "
                           "unset it (`unset WANDB_MODE`: logger=wandb then runs offline) or set it to one of those")
    return str(mode or env or "offline")  # a plain str for wandb.init, not the enum member


def wandb_failure(error: Exception, mode: str) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if mode == "online" and "api key" in first.lower():
        return (f"logger=wandb logger.mode=online needs a W&B API key ({first}); run `wandb login` or set "
                "WANDB_API_KEY, or log offline (logger.mode=offline) and `wandb sync` later")
    return (f"wandb could not start a run in mode {mode} ({first}); check logger.* and WANDB_* settings, "
            "or use logger=none")


def check_tracker(backend: str, mode: str | None) -> None:
    """What only the environment can refuse, before a stage starts: WANDB_MODE (logger.* values are checked at
    compose time; the API key only wandb.init knows; wandb itself is a dependency, always installed)."""
    if LoggerBackend(backend) is LoggerBackend.wandb:
        wandb_mode(mode)


def run_identity(experiment: str, job_dir: Path, stage: str, iteration: int) -> tuple[str, str]:
    """(group, name) of a stage's wandb run. The group is the job's experiment: `<experiment>`, or in a
    sweep `<experiment>/<job>` (outputs/<experiment>/seed=1), so each sweep job's runs group apart; the
    name starts with the group, so names are unique across jobs too."""
    group = f"{experiment}/{job_dir.name}" if job_dir.parent.name == experiment else experiment
    return group, f"{group}/iter_{iteration}/{stage}"


def start_tracker(backend: str, project: str, experiment: str, stage: str, iteration: int, config: dict,
                  experiment_dir: Path, mode: str | None = None, entity: str | None = None) -> Tracker:
    """experiment_dir: where wandb writes, `<the job's experiment dir>/wandb`."""
    if LoggerBackend(backend) is LoggerBackend.none:
        return Tracker()
    directory = Path(experiment_dir)
    group, name = run_identity(experiment, directory.parent, stage, iteration)
    return WandbTracker(project, group, name, config, directory, mode, entity, iteration)
