"""Installing on a GPU machine (issue 22): the distribution name, the extras' pins, and the embedded data
brought onto machines without PyPI (`python -m tsalign.data fetch --cache DIR`)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tsalign import data
from tsalign.errors import TsalignError

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NAME = PROJECT["name"]
EXTRAS = PROJECT["optional-dependencies"]

# What pip prints offline (pip 23.2, index unreachable: connection refused; a DNS failure reads alike).
PIP_OFFLINE_STDERR = """\
WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by \
'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new \
connection: [Errno -3] Temporary failure in name resolution')': /simple/alpaca-eval/
ERROR: Could not find a version that satisfies the requirement alpaca-eval==0.6.6 (from versions: none)
ERROR: No matching distribution found for alpaca-eval==0.6.6
"""

# Requires-Dist of the vLLM releases trl 1.16's `vllm` extra allows near our pins, read from the wheels' metadata
# with `pip install --dry-run --report` (2026-12-04). 0.31.0 caps transformers below our 5.19.0 pin.
VLLM_REQUIRES = {
    "0.30.0": {"transformers": ">=5.10.4", "torch": "==2.13.0"},
    "0.31.0": {"transformers": ">=5.10.4,<5.18.0", "torch": "==2.13.0"},
}
TRL_VLLM_RANGE = ">=0.22.0,<=0.31.0"  # trl 1.16.0's Requires-Dist: vllm<=0.31.0,>=0.22.0; extra == "vllm"


def requirement(name: str, reqs: list[str]) -> Requirement:
    found = [r for r in map(Requirement, reqs) if canonicalize_name(r.name) == canonicalize_name(name)]
    assert len(found) == 1, f"{name} in {reqs}"
    return found[0]


def pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not a pin"
    return spec.version


# ---------------------------------------------------------------- the distribution name


def test_distribution_name_is_not_the_dna_aligner():
    # PyPI's `tsalign` (a DNA aligner, 7.0.2) is not us: `pip install tsalign[vllm]` installs it and drops the extra
    assert canonicalize_name(NAME) != "tsalign"
    assert PROJECT["scripts"]["tsalign"] == "tsalign.cli:main"  # the command and the import package keep the name


def extra_mentions(text: str) -> list[str]:
    """Names written as NAME[extra,...] with only this project's extras ('.[dev]' and paths are not names)."""
    found = re.findall(r"(?<![\w./-])([A-Za-z][\w.-]*)\[([\w,-]+)\]", text)
    return [name for name, extras in found if set(extras.split(",")) <= set(EXTRAS)]


def test_install_hints_use_the_distribution_name():
    assert extra_mentions("`pip install 'tsalign[vllm]'` or pip extra tsalign[dev,launchers]") == ["tsalign"] * 2
    assert extra_mentions("pip install -e '.[dev]' ray[default] /work/main[vllm] SDISTS[name]") == []
    files = [*REPO.glob("tsalign/**/*.py"), *REPO.glob("conf/**/*.yaml"), REPO / "Makefile",
             *REPO.glob("benchmarks/*.py")]
    wrong = [f"{path.relative_to(REPO)}:{i}: {name}[...]" for path in files
             for i, line in enumerate(path.read_text().splitlines(), 1)
             for name in extra_mentions(line) if canonicalize_name(name) != canonicalize_name(NAME)]
    assert not wrong, f"install hints must say `pip install '{NAME}[...]'`: {wrong}"


def test_missing_vllm_hint_names_keys_the_schema_accepts(monkeypatch, compose):
    from tsalign.engines.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TsalignError) as e:
        import_vllm()
    message = str(e.value)
    assert f"pip install '{NAME}[vllm]'" in message and "\n" not in message
    assert "teacher.vllm=null" not in message
    cfg = compose(["sampler=hf", "teacher.vllm.enabled=false"])  # the hint's overrides compose
    assert cfg.sampler.backend == "hf" and cfg.teacher.vllm.enabled is False


# ---------------------------------------------------------------- the extras


def test_vllm_pin_resolves_with_the_project_pins():
    version = pinned(requirement("vllm", EXTRAS["vllm"]))
    assert version in VLLM_REQUIRES, f"vllm=={version}: add its Requires-Dist to VLLM_REQUIRES"
    needs = VLLM_REQUIRES[version]
    transformers = pinned(requirement("transformers", PROJECT["dependencies"]))
    assert Requirement(f"transformers{needs['transformers']}").specifier.contains(transformers)
    torch = Requirement(f"torch{needs['torch']}").specifier
    torch_range = requirement("torch", PROJECT["dependencies"]).specifier
    assert any(torch_range.contains(v) for v in map(Version, [s.version for s in torch])), (torch, torch_range)
    assert Requirement(f"vllm{TRL_VLLM_RANGE}").specifier.contains(version)  # trl's vLLM integration accepts it
    # the release after the pin is the one that does not resolve: the pin is the newest that does
    assert not Requirement(f"transformers{VLLM_REQUIRES['0.31.0']['transformers']}").specifier.contains(transformers)


def test_every_extra_is_pinned():
    for extra, reqs in EXTRAS.items():
        for req in map(Requirement, reqs):
            assert pinned(req), f"[{extra}] {req}"


def pip_dry_run(reqs: list[str], report: Path) -> dict[str, str]:
    """What pip's resolver would install for `reqs` (nothing is installed): {name: version}; skips offline."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report),
           *reqs]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode and data.index_unreachable(done.stderr):
        pytest.skip("PyPI cannot be reached from this machine: the resolver check needs it")
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


@pytest.mark.slow
def test_gpu_extras_resolve_with_the_project_pins(tmp_path):
    # what `pip install 'NAME[vllm,deepspeed]'` resolves to (~40 s with a warm pip cache)
    got = pip_dry_run([*PROJECT["dependencies"], *EXTRAS["vllm"], *EXTRAS["deepspeed"]], tmp_path / "report.json")
    assert got["vllm"] == pinned(requirement("vllm", EXTRAS["vllm"]))
    assert got["deepspeed"] == pinned(requirement("deepspeed", EXTRAS["deepspeed"]))
    for name in ("transformers", "trl", "accelerate"):
        assert got[name] == pinned(requirement(name, PROJECT["dependencies"])), name
    assert Version(got["torch"]).public == VLLM_REQUIRES[got["vllm"]]["torch"].removeprefix("==")


# ---------------------------------------------------------------- embedded data on machines without PyPI


def fake_pip(returncode: int = 0, stderr: str = ""):
    """subprocess.run standing in for `pip download`: writes a small sdist holding the members SDISTS names."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            package, version = cmd[-1].split("==")
            dest = Path(cmd[cmd.index("-d") + 1]) / f"{package.replace('-', '_')}-{version}.tar.gz"
            with tarfile.open(dest, "w:gz") as tar:
                for name, (pkg, _, member) in data.SDISTS.items():
                    if pkg == package:
                        body = json.dumps([{"instruction": f"{name} fixture", "input": ""}]).encode()
                        info = tarfile.TarInfo(member)
                        info.size = len(body)
                        tar.addfile(info, io.BytesIO(body))
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run, calls


def test_offline_download_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    run, _ = fake_pip(returncode=1, stderr=PIP_OFFLINE_STDERR)
    monkeypatch.setattr(data.subprocess, "run", run)
    with pytest.raises(TsalignError) as e:
        data.load_prompt_pool("alpaca_eval", tmp_path)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert "cannot be reached" in message and "No matching distribution" not in message  # pip's misleading last line
    assert "python -m tsalign.data fetch --cache DIR" in message and "TSALIGN_CACHE=DIR" in message
    assert str(tmp_path) in message  # where a copied cache goes
    assert not list(tmp_path.rglob("*.tar.gz")) and not list(tmp_path.rglob("*.json"))  # nothing half-written
    assert [p.name for p in (tmp_path).iterdir()] == ["data"]  # pip's temporary folder is gone too

    assert data.main(["fetch", "--cache", str(tmp_path)]) == 2  # the command says the same, in one line
    err = capsys.readouterr().err.strip()
    assert err.startswith("tsalign: error: could not download") and "\n" not in err


def test_other_pip_failures_keep_pips_reason(tmp_path, monkeypatch):
    run, _ = fake_pip(returncode=1, stderr="ERROR: No matching distribution found for alpaca-eval==0.6.6\n")
    monkeypatch.setattr(data.subprocess, "run", run)
    with pytest.raises(TsalignError, match=r"\(pip: No matching distribution found for alpaca-eval==0\.6\.6\)"):
        data.embedded_file("alpaca_eval", tmp_path)


def test_fetch_fills_the_cache_once(tmp_path, monkeypatch, capsys):
    run, calls = fake_pip()
    monkeypatch.setattr(data.subprocess, "run", run)
    cache = tmp_path / "cache"
    assert data.main(["fetch", "--cache", str(cache)]) == 0
    assert len(calls) == 2  # one sdist each: alpaca-eval, llamafactory (its four files from one download)
    for name in data.SDISTS:
        assert json.loads((cache / "data" / f"{name}.json").read_text())[0]["instruction"] == f"{name} fixture"
    out = capsys.readouterr().out
    assert all(name in out for name in data.SDISTS) and "TSALIGN_CACHE" in out
    # the copied cache is all a run needs: no pip call, even with pip failing as it does offline
    offline, offline_calls = fake_pip(returncode=1, stderr=PIP_OFFLINE_STDERR)
    monkeypatch.setattr(data.subprocess, "run", offline)
    copy = tmp_path / "node_cache"
    (copy / "data").mkdir(parents=True)
    for f in (cache / "data").glob("*.json"):
        (copy / "data" / f.name).write_bytes(f.read_bytes())
    assert data.load_prompt_pool("alpaca_eval", copy)[0]["messages"][0]["content"] == "alpaca_eval fixture"
    assert not offline_calls


def test_default_cache_is_the_configs(monkeypatch, tmp_path, compose):
    monkeypatch.setenv("TSALIGN_CACHE", str(tmp_path))
    assert data.default_cache() == tmp_path
    assert Path(compose([]).paths.cache) == tmp_path  # conf/config.yaml's paths.cache reads the same variable


@pytest.mark.slow
def test_fetch_for_real(tmp_path):
    # the real sdists from PyPI (~10 s): every embedded file lands, with the sizes the stages expect
    try:
        files = data.fetch_all(tmp_path)
    except TsalignError as e:
        if "cannot be reached" in str(e):
            pytest.skip("PyPI cannot be reached from this machine: the real fetch needs it")
        raise
    assert set(files) == set(data.SDISTS)
    assert len(data.load_prompt_pool("alpaca_eval", tmp_path)) == 805
    assert len(data.load_human_pairs("llamafactory_dpo", tmp_path)) == 300
