"""`accelerate launch --num_processes 2` on CPU (gloo): dpo and distill train data-parallel, one
process writes, and the result matches one process with the same effective batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_stage_inprocess
from safetensors.torch import load_file

from tsalign.artifacts.store import read_manifest, stage_dir
from tsalign.config.options import accelerate_config_file
from tsalign.pipeline.loop import stage_launcher

# dropout off in the tiny student, so one process and two see the same arithmetic
STUDENT = ["+student.tiny.hidden_dropout_prob=0.0", "+student.tiny.attention_probs_dropout_prob=0.0"]
PAIRS = ["data.prompts_per_iteration=8", "generate.num_candidates=4", "rank.selection=all"]


def launch_two(outputs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--dynamo_backend", "no", "-m", "tsalign.cli", "model=tiny", "device=cpu",
           f"paths.outputs={outputs}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    """generate + rank of iteration 0 on tiny models, copied as experiments 'one' and 'two'."""
    out = tmp_path_factory.mktemp("multiprocess")
    for stage in ("generate", "rank"):
        run_stage_inprocess(stage, out, ["experiment_name=one", "device=cpu", *PAIRS])
    shutil.copytree(out / "one", out / "two")
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < atol, f"largest weight difference {worst}"


def only_finished_outputs(directory: Path) -> None:
    """One manifest, no temp or half-written folders beside the outputs."""
    assert read_manifest(directory) is not None
    strays = [p.name for p in directory.parent.iterdir() if ".tmp" in p.name or ".redo" in p.name]
    strays += [p.name for p in directory.iterdir() if p.name.startswith(".") or p.name == "_work"]
    assert not strays, strays


def test_dpo_on_two_processes_matches_one_with_the_same_effective_batch(ranked):
    base = ["stage=dpo", "iteration=0", *PAIRS, "dpo.max_steps=3", "optimizer.learning_rate=1e-3"]
    _, single = run_stage_inprocess("dpo", ranked, ["experiment_name=one", "device=cpu", *base, "dpo.batch_size=2"])
    done = launch_two(ranked, "experiment_name=two", *base, "dpo.batch_size=1")
    assert done.returncode == 0, done.stderr[-3000:]
    two = stage_dir(ranked / "two", 0, "dpo")
    only_finished_outputs(two)
    manifest = read_manifest(two)
    assert manifest["counts"]["steps"] == single["counts"]["steps"] == 3
    assert manifest["counts"]["first_loss"] == pytest.approx(single["counts"]["first_loss"], abs=1e-4)
    assert_same_weights(two / "policy", stage_dir(ranked / "one", 0, "dpo") / "policy", atol=1e-4)
    # the weights moved: the match is not two untrained copies of pi_0
    before = weights(Path(single["inputs"]["policy"]["path"])) if "policy" in single["inputs"] else None
    assert before is None or any(not torch.equal(before[k], weights(two / "policy")[k]) for k in before)


def test_an_error_on_the_main_process_stops_every_process(ranked):
    """dpo of 'two' is finished (the test above); another config is refused on the main process, and the
    other process gets the same error instead of waiting at a barrier forever."""
    base = ["stage=dpo", "iteration=0", *PAIRS, "dpo.max_steps=3", "optimizer.learning_rate=1e-3"]
    done = launch_two(ranked, "experiment_name=two", *base, "dpo.batch_size=2")
    assert done.returncode != 0
    assert "different config" in done.stderr + done.stdout


def test_distill_on_two_processes_matches_one(ranked):
    base = ["stage=distill", "iteration=0", *PAIRS, *STUDENT, "distill.batch_size=4", "distill.epochs=2",
            "distill.learning_rate=1e-3", "distill.holdout_fraction=0.0"]
    _, single = run_stage_inprocess("distill", ranked, ["experiment_name=one", "device=cpu", *base])
    done = launch_two(ranked, "experiment_name=two", *base)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = stage_dir(ranked / "two", 0, "distill")
    only_finished_outputs(two)
    counts = read_manifest(two)["counts"]
    assert counts["steps"] == single["counts"]["steps"] > 1 and counts["train_pairs"] == single["counts"]["train_pairs"]
    # the held-out figures come from the main process, which alone saves (and so can load) the student
    assert counts["human_labels_rows"] == single["counts"]["human_labels_rows"] == 300
    # Adam magnifies float-summation-order noise on near-zero gradients, so compare the whole update:
    # the two runs' difference must be small next to how far training moved the student
    one, two_w = weights(stage_dir(ranked / "one", 0, "distill") / "student"), weights(two / "student")
    start = weights(Path(read_manifest(two)["student_from"]))
    moved = sum(((one[k].float() - start[k].float()) ** 2).sum().item() for k in start) ** 0.5
    apart = sum(((one[k].float() - two_w[k].float()) ** 2).sum().item() for k in start) ** 0.5
    assert moved > 1e-3 and apart < 0.05 * moved, (apart, moved)


def test_other_stages_refuse_to_run_under_accelerate(ranked):
    done = launch_two(ranked, "experiment_name=two", "stage=rank", "iteration=0", *PAIRS)
    assert done.returncode != 0
    assert "stage=rank runs in one process" in done.stderr + done.stdout


def test_the_loop_launches_training_stages_through_accelerate(compose):
    cfg = compose(["launch.processes=2"])
    assert stage_launcher(cfg, "generate") == [sys.executable, "-m", "tsalign.cli"]
    assert stage_launcher(cfg, "dpo")[:5] == [sys.executable, "-m", "tsalign.pipeline.launch", "--multi_gpu",
                                              "--num_processes"]
    zero3 = stage_launcher(compose(["launch.accelerate_config=deepspeed_zero3"]), "distill")
    assert zero3[3:5] == ["--config_file", str(accelerate_config_file("deepspeed_zero3"))] and "--num_processes" not in zero3


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(accelerate_config_file(name)))
    assert config.num_machines == 1 and config.mixed_precision == "bf16"
    assert {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
            "fsdp": "FSDP"}[name] == config.distributed_type.value


DIES = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    time.sleep(1)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("tsalign: error: the stage's own line", file=sys.stderr)
    sys.exit(2)
time.sleep(120)  # rank 0: stopped by the launcher when rank 1 dies
"""


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_a_dead_process_of_a_launched_stage_ends_in_one_tsalign_line(tmp_path, how):
    """The loop's `accelerate launch` (tsalign.pipeline.launch): one process killed (kill -9, the OOM killer) or
    failing: accelerate stops the other and the run ends in one line naming the process and the cause, exit 1,
    no launcher traceback."""
    script = tmp_path / "dies.py"
    script.write_text(DIES)
    cmd = [*stage_launcher_args(), "--num_machines", "1", "--dynamo_backend", "no", str(script), how]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    expected = "was killed by SIGKILL (the kernel's out-of-memory killer" if how == "kill" else \
        "exited with code 2 (its error is above)"
    assert last.startswith(f"tsalign: error: process 1 of 2 {expected}"), last
    assert "rerun the same command" in last


def test_tsalign_launch_is_the_same_launcher_under_its_own_name(tmp_path):
    """What a user types instead of `accelerate launch` (README: Scaling out): the console script, one line too."""
    launcher = Path(sys.executable).with_name("tsalign-launch")
    assert launcher.is_file(), "pip install -e . installs tsalign-launch (pyproject.toml [project.scripts])"
    script = tmp_path / "dies.py"
    script.write_text(DIES)
    cmd = [str(launcher), *stage_launcher_args()[3:], "--num_machines", "1", "--dynamo_backend", "no", str(script),
           "exit"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("tsalign: error: process 1 of 2 exited with code 2")


def stage_launcher_args() -> list[str]:
    """The loop's own launch command for a 2-process training stage, without the tsalign.cli part."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"launch": {"processes": 2, "generate_processes": 1, "accelerate_config": None}})
    cmd = stage_launcher(cfg, "dpo")
    return cmd[:cmd.index("-m", 2)]
