"""The one entry point: `tsalign stage=<generate|rank|distill|dpo|evaluate|loop> [overrides]`.

    tsalign stage=generate iteration=0 data.max_prompts=8
    tsalign stage=loop iterations=2
    tsalign -m iteration=0,1 stage=generate,rank,distill,dpo     # pipeline order, one experiment
    tsalign -m stage=loop seed=1,2 dpo.beta=0.05,0.1              # one experiment per job
    tsalign stage=generate model=llama --cfg job                  # print the composed config
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from tsalign import distributed, interrupt
from tsalign.config.overrides import composition_error
from tsalign.config.schema import conf_dir, register_configs
from tsalign.errors import TsalignError
from tsalign.views.tracking import check_tracker

CONF_DIR = str(conf_dir())
# errors of a folder that cannot be written: one line naming it, not a traceback
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)
# a full disk or quota: another folder is not the fix, space is (a rerun resumes: writes are atomic)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# how a full disk reads where no errno survives (safetensors: "I/O error: No space left on device (os error 28)")
DISK_FULL_TEXT = tuple(os.strerror(n) for n in DISK_FULL)
DISK_FULL_FIX = "free space and rerun the same command: finished work is kept"


def validate(cfg: DictConfig) -> None:
    """Every value problem at once, before anything loads. OmegaConf.to_object builds the schema's dataclasses,
    and TsalignConfig.__post_init__ raises one TsalignError listing what each section's problems() found
    (tsalign/config/schema.py). The objects are dropped: the stages read the DictConfig."""
    try:
        OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:  # a user's option file that leaves a required key at ???
        raise TsalignError(f"{e.full_key} has no value (??? in the config); set {e.full_key}=...") from None
    except InterpolationResolutionError as e:  # e.g. ${oc.env:HOME} with HOME unset
        raise TsalignError(f"{e.full_key}: {str(e).splitlines()[0]}") from None


def swept_keys(hc) -> set[str]:
    """Keys the multirun sweeps over (several values), read from the sweep's multirun.yaml (written
    before any job starts, also seen by remote launchers on shared storage), else from argv."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = Path(hc.sweep.dir) / "multirun.yaml"
    task = list(OmegaConf.load(saved).hydra.overrides.task) if saved.is_file() else [
        a for a in sys.argv[1:] if not a.startswith("-")]
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}


def experiment_dir(cfg: DictConfig) -> Path:
    """outputs/<experiment_name>; in a sweep (`tsalign -m seed=1,2`) plus the job's swept values
    (`seed=1`), except the pipeline position (stage, iteration), which shares one experiment."""
    if cfg.experiment_dir:
        return Path(cfg.experiment_dir).resolve()
    root = Path(cfg.paths.outputs) / cfg.experiment_name
    from hydra.core.hydra_config import HydraConfig

    if in_multirun():
        hc = HydraConfig.get()
        keys = swept_keys(hc) - set(hc.job.config.override_dirname.exclude_keys)
        job = sorted(o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0] in keys)
        if job:
            root = root / ",".join(job).replace("/", "_")
    return root.resolve()


def configure(cfg: DictConfig) -> DictConfig:
    validate(cfg)
    cfg.experiment_dir = str(experiment_dir(cfg))
    check_tracker(cfg.logger.backend, cfg.logger.mode)  # what only the environment can refuse (WANDB_MODE)
    from tsalign.distributed import narrow_visible_gpus
    from tsalign.stages.registry import REGISTRY

    stage = REGISTRY.get(str(cfg.stage))
    note = narrow_visible_gpus(str(cfg.stage), stage is not None and stage.trains)  # before CUDA starts
    if note:
        print(note)
    from tsalign.stages.engine_pick import SAMPLING, resolve_auto_sampler, set_threads

    set_threads(cfg)  # the CPUs no other process keeps busy, unless threads=N
    if str(cfg.stage) in SAMPLING:
        resolve_auto_sampler(cfg)  # sampler=auto: the engine every stage of this run samples with
    return cfg


def show_status(cfg: DictConfig) -> None:
    from tsalign.views.status import main

    main(Path(cfg.experiment_dir), cfg.iterations)


def write_report(cfg: DictConfig) -> None:
    from tsalign.views.report import main

    main(Path(cfg.experiment_dir))


def show_plan(cfg: DictConfig) -> None:
    from tsalign.views.plan import main

    main(cfg)


def run_loop(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tsalign.pipeline.loop import run_loop as loop

    loop(cfg, list(HydraConfig.get().overrides.task))


# stage= values that are not stages: commands over an experiment (every other value is a registry stage)
COMMANDS = {"loop": run_loop, "status": show_status, "report": write_report, "plan": show_plan}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        configure(cfg)
        print(f"[tsalign] stage={cfg.stage} iteration={cfg.iteration} experiment={cfg.experiment_dir} "
              f"policy={cfg.policy.name} teacher={cfg.teacher.name} student={cfg.student.name} "
              f"sampler={cfg.sampler.backend}")
        command = COMMANDS.get(str(cfg.stage))
        if command is not None:
            command(cfg)
        else:  # a stage of tsalign.stages.registry
            from tsalign.pipeline.runner import run_stage

            run_stage(cfg, str(cfg.stage))
    except KeyboardInterrupt:
        print(interrupt.INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 -- what has no one-line form is re-raised: its traceback is the report
        line = one_line(e, cfg)
        if line is None:
            raise
        if in_multirun():
            print(f"tsalign: error: {line}", file=sys.stderr)
            raise SweepJobFailed(f"tsalign: error: this sweep job failed: {line}; the other jobs ran to their end "
                                 "(rerun the same command to retry: finished stages are skipped)") from None
        fail(line)


class SweepJobFailed(CompactHydraException):
    """A sweep job's one-line error, handed to Hydra instead of exiting: Hydra records it as the job's result,
    runs the other jobs to their end (an exit would make joblib stop them mid-stage) and prints this line,
    not a traceback (CompactHydraException), exiting 1."""


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def one_line(e: Exception, cfg: DictConfig) -> str | None:
    """The one-line error of a failure the user can fix, or None."""
    full = disk_full(e, cfg)
    if full:  # also under a TsalignError that wrapped it (an engine that could not start)
        return full
    if isinstance(e, TsalignError):
        return str(e)
    if isinstance(e, OSError) and e.errno in UNWRITABLE and e.filename:
        return (f"cannot write {e.filename} ({e.strerror}); set paths.outputs (now {cfg.paths.outputs}) to a "
                "writable folder")
    return None


def causes(e: BaseException) -> list[BaseException]:
    """`e` and what it was raised from or while handling (also when hidden by `from None`)."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in DISK_FULL
    return any(text in str(e) for text in DISK_FULL_TEXT)


def disk_full(e: BaseException, cfg: DictConfig) -> str | None:
    """ENOSPC / EDQUOT anywhere under `e` as one line: where, and that a rerun resumes. Whoever raised it (a write
    of the stage, of a library's save, of a temporary file), the fix is the same."""
    found = next((c for c in causes(e) if is_disk_full(c)), None)
    if found is None:
        return None
    where, notes = getattr(found, "filename", None), []
    if not where:
        where, free = fullest(cfg)
        notes.append(f"{free} free")
    if not isinstance(found, OSError):
        notes.append(f"{type(found).__name__}: {str(found).splitlines()[0][:200]}")
    elif found.errno != errno.ENOSPC:
        notes.append(found.strerror)
    detail = f" ({'; '.join(notes)})" if notes else ""
    return f"no space left on device writing {where}{detail}; {DISK_FULL_FIX}"


def fullest(cfg: DictConfig) -> tuple[str, str]:
    """Where the file was (not named by the error): of the folders a run writes to (the experiment, the model
    cache, temporary files), `under <folder>` with the least free space, and that space."""
    free = {}
    for folder in (cfg.get("experiment_dir") or cfg.paths.outputs, cfg.paths.cache, tempfile.gettempdir()):
        existing = Path(folder).expanduser()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        with contextlib.suppress(OSError):  # a folder that cannot be read is not where the write went
            free[str(folder)] = shutil.disk_usage(existing).free
    folder = min(free, key=free.get)
    size = f"{free[folder] / 2**30:.1f} GiB" if free[folder] >= 2**30 else f"{free[folder] / 2**20:.1f} MiB"
    return f"under {folder}", size


def fail(message: str) -> None:
    print(f"tsalign: error: {message}", file=sys.stderr)
    sys.exit(2)


HYDRA_BYTES = 64 * 1024  # more than Hydra writes into its run folder (.hydra/*.yaml) before a stage starts


def unwritable(path: Path) -> str | None:
    """Why files cannot be created under `path` (it need not exist yet), or None. Tried, not guessed
    from permission bits: root ignores those, a read-only mount does not. The probe has Hydra's size: on a
    full disk an empty file can still be made, and Hydra's own writes failed with a traceback."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(bytes(HYDRA_BYTES))
            probe.flush()
            return None
    except OSError as e:
        return f"{existing}: {e.strerror}"


def output_folders(config: DictConfig, hydra_dir: str) -> dict[str, str]:
    """{key: folder} of every folder this run writes under (hydra_dir: run or sweep)."""
    folders = {"paths.outputs": config.paths.outputs}
    if config.get("experiment_dir"):
        folders["experiment_dir"] = config.experiment_dir
    folders[f"hydra.{hydra_dir}.dir"] = config.hydra[hydra_dir].dir
    return folders


class OutputsWritable(Callback):
    """Refuses an output folder that cannot be written before Hydra creates its run folder in it,
    with one line instead of Hydra's report of a mkdir traceback."""

    def check(self, config: DictConfig, hydra_dir: str) -> None:
        for key, folder in output_folders(config, hydra_dir).items():
            why = unwritable(Path(folder).expanduser())
            if why and any(text in why for text in DISK_FULL_TEXT):
                fail(f"no space left on device writing {key}={folder} ({why}); {DISK_FULL_FIX}")
            if why:
                fail(f"{key}={folder} cannot be written ({why}); set paths.outputs to a writable folder")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.check(config, "sweep")
        refuse_parallel_pipeline(config)


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
# swept keys left out of a job's experiment name that still give each job its own experiment root
OWN_ROOT = ("experiment_name", "experiment_dir", "paths.outputs")
# hydra/launcher options and the plugin each needs (all in the pip extra tsalign-cli[launchers])
LAUNCHER_PLUGINS = {"joblib": "hydra_joblib_launcher", "submitit_local": "hydra_submitit_launcher",
                    "submitit_slurm": "hydra_submitit_launcher", "slurm": "hydra_submitit_launcher",
                    "ray": "hydra_ray_launcher", "ray_aws": "hydra_ray_launcher"}


def shared_sweep_keys(task_overrides: list[str], exclude_keys: list[str]) -> list[str]:
    """Swept keys whose jobs share one experiment (stage, iteration: a pipeline multirun), whose jobs
    depend on each other and so must run one after the other, in override order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(task_overrides) if o.is_sweep_override()}
    return sorted(k for k in swept if k in exclude_keys and k not in OWN_ROOT)


def refuse_parallel_pipeline(config: DictConfig) -> None:
    """A launcher that runs jobs at once (joblib, submitit, ray) would start rank before its generate."""
    hc = config.hydra
    if hc.launcher.get("_target_") == BASIC_LAUNCHER:
        return
    shared = shared_sweep_keys(list(hc.overrides.task), list(hc.job.config.override_dirname.exclude_keys))
    if shared:
        launcher = hc.runtime.choices.get("hydra/launcher") or hc.launcher.get("_target_")
        fail(f"hydra/launcher={launcher} runs sweep jobs at the same time, but sweeping {', '.join(shared)} makes jobs "
             "of one experiment that must run in order; drop hydra/launcher= for this multirun (the basic launcher "
             "runs them in override order) or sweep stage=loop over keys that name experiments (seed=1,2)")


def missing_launcher(argv: list[str]) -> str | None:
    """The fix when argv picks a hydra/launcher whose plugin is not installed (else Hydra lists the
    options it knows, without saying how to get the others)."""
    import importlib.util

    for arg in argv:
        name = arg.split("=", 1)[1] if arg.startswith(("hydra/launcher=", "+hydra/launcher=")) else None
        plugin = LAUNCHER_PLUGINS.get(name)
        if plugin and importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
            return (f"hydra/launcher={name} needs the {plugin.replace('_', '-')} plugin: `make setup LAUNCHERS=1` "
                    "(or pip install 'tsalign-cli[launchers]')")
    return None


def main() -> None:
    # offline by default: nothing is fetched from a model hub at run time (set before transformers loads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from tsalign.engines.allocator import keep_freed_memory

    keep_freed_memory()  # before tensors are allocated; stage processes and vLLM's inherit it
    interrupt.install()  # Ctrl-C: KeyboardInterrupt, and an exit within seconds if something swallows it
    register_configs()
    problem = missing_launcher(sys.argv[1:]) or composition_error(sys.argv[1:], CONF_DIR)
    if problem:
        fail(problem)
    _main()
    distributed.finish()


if __name__ == "__main__":
    main()


def model_dir_main(argv: list[str] | None = None) -> None:
    """`tsalign-model-dir <teacher|policy|student> [overrides]`: print the local folder of a configured model, to
    start a server on it (the fitted CPU teacher is fitted first, SmolLM2 converted from its GGUF once)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("teacher", "policy", "student"):
        sys.exit("usage: tsalign-model-dir <teacher|policy|student> [overrides]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tsalign.stages.factory import teacher_model_dir
    from tsalign.stages.lineage import base_model_dir

    register_configs()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", argv[1:])
    OmegaConf.set_readonly(cfg, False)
    try:
        configure(cfg)
        role = argv[0]
        folder = teacher_model_dir(cfg) if role == "teacher" else base_model_dir(cfg, cfg[role])
    except TsalignError as e:
        fail(str(e))
    if folder is None:
        sys.exit(f"{role} is served over HTTP ({cfg.teacher.served.base_url}): it has no local folder")
    print(folder)
