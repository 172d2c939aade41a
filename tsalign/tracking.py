"""Experiment tracking: wandb (offline unless told) or nothing. One run per (iteration, stage)."""

from __future__ import annotations

import os
from pathlib import Path

from tsalign.choices import LoggerBackend


class Tracker:
    """No-op tracker (logger=none); the wandb one below has the same three methods."""

    report_to: list[str] = []

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

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
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, job_type=name.split("/")[-1],
                              config=config, dir=str(directory), mode=mode or os.environ.get("WANDB_MODE", "offline"),
                              reinit="finish_previous")

    def log(self, metrics: dict, step: int | None = None) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.run.log(flat, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self) -> None:
        self._wandb.finish()


def start_tracker(backend: str, project: str, experiment: str, stage: str, iteration: int, config: dict,
                  experiment_dir: Path, mode: str | None = None, entity: str | None = None) -> Tracker:
    if LoggerBackend(backend) is LoggerBackend.none:
        return Tracker()
    return WandbTracker(project, experiment, f"iter_{iteration}/{stage}", config, Path(experiment_dir), mode, entity)
