"""The GPU path's confirmed breakages (issue 22), each pinned on this CPU: collectives on the process's
device, several visible GPUs in a single-process training stage, the llama preset's own data and sizes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tsalign import distributed
from tsalign.errors import TsalignError
from tsalign.stages.registry import REGISTRY


@pytest.fixture
def launched_with(monkeypatch):
    """Pretend to be process `rank` of `world` under accelerate launch, with a given backend."""

    def launch(backend: str, rank: int = 1, world: int = 2):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setattr(distributed, "state", lambda: None)
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)

    return launch


def test_collectives_use_the_cuda_device_of_the_process_under_nccl(launched_with):
    """NCCL (accelerate's backend for DDP / DeepSpeed / FSDP on GPUs) takes CUDA tensors only: a CPU tensor
    fails at the first distill step with "No backend type associated with device type cpu"."""
    launched_with("nccl", rank=3, world=4)
    assert distributed.collective_device() == torch.device("cuda", 3)
    launched_with("gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_mean_over_processes_puts_its_tensor_on_the_collective_device(launched_with, monkeypatch):
    """The device the all-reduce is called with is the one collective_device names (meta stands in for
    cuda:<local rank>, which this CPU cannot allocate)."""
    launched_with("nccl")
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise RuntimeError("stop here: a meta tensor holds no value")

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.mean_over_processes(0.5, 2.0)
    assert seen == [torch.device("meta")]


@pytest.fixture
def visible_gpus(monkeypatch):
    """torch.cuda as on a node with `count` GPUs: device_count reads CUDA_VISIBLE_DEVICES as torch does
    before CUDA starts (or ignores it, `counted_already`, as after)."""

    def node(count: int, counted_already: bool = False):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

        def device_count():
            visible = None if counted_already else __import__("os").environ.get("CUDA_VISIBLE_DEVICES")
            return count if visible is None else len(visible.split(","))

        monkeypatch.setattr(torch.cuda, "device_count", device_count)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    return node


def narrow(stage: str):
    """What the CLI does before a stage starts (tsalign.cli.configure)."""
    return distributed.narrow_visible_gpus(stage, stage in REGISTRY and REGISTRY[stage].trains)


@pytest.mark.parametrize("stage", ["dpo", "distill", "pdistill"])
def test_a_training_stage_run_in_one_process_keeps_one_of_several_gpus(visible_gpus, stage):
    """Without it transformers' Trainer sees n_gpu = 8: TRL's DPOTrainer raises "does not support
    nn.DataParallel" after an 8B policy has loaded, and pdistill's Trainer silently wraps it."""
    import os

    visible_gpus(8)
    note = narrow(stage)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and torch.cuda.device_count() == 1
    assert "8 GPUs visible" in note and "--num_processes 8" in note and "launch.processes=8" in note


def test_narrowing_keeps_the_first_gpu_the_user_made_visible(visible_gpus, monkeypatch):
    import os

    visible_gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    narrow("dpo")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_too_late_to_narrow_is_one_line_naming_the_fix(visible_gpus):
    visible_gpus(4, counted_already=True)
    with pytest.raises(TsalignError, match=r"4 GPUs are visible and stage=dpo .*CUDA_VISIBLE_DEVICES=0"):
        narrow("dpo")


@pytest.mark.parametrize("stage", ["generate", "rank", "evaluate", "loop"])
def test_engines_and_the_loop_keep_every_gpu(visible_gpus, stage):
    """vLLM engines take sampler / judge tensor_parallel_size GPUs; the loop's children narrow themselves."""
    import os

    visible_gpus(8)
    assert narrow(stage) is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_under_accelerate_launch_nothing_is_narrowed(visible_gpus, monkeypatch):
    import os

    visible_gpus(8)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert narrow("dpo") is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_the_cli_narrows_before_the_stage_starts(visible_gpus, compose, capsys):
    """tsalign.cli.configure runs before any model loads or CUDA starts."""
    import os

    import tsalign.cli

    visible_gpus(2)
    tsalign.cli.configure(compose(["stage=dpo"]))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and "2 GPUs visible" in capsys.readouterr().out


# ---------------------------------------------------------------- the llama preset

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
SKYWORK_RM = {**LLAMA_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
DEBERTA_V3_LARGE = {"architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2",
                    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "vocab_size": 128100, "max_position_embeddings": 512,
                    "position_biased_input": False, "relative_attention": True, "position_buckets": 256,
                    "max_relative_positions": -1, "num_labels": 1}


def fake_hub_model(cache: Path, repo_id: str, config: dict) -> None:
    """A model in the local HF cache (config.json only), as `hf download` leaves it."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def llama_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fake_hub_model(cache, "meta-llama/Llama-3.1-8B-Instruct", LLAMA_8B)
    fake_hub_model(cache, "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2", SKYWORK_RM)
    fake_hub_model(cache, "OpenAssistant/reward-model-deberta-v3-large-v2", DEBERTA_V3_LARGE)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_the_llama_preset_composes_and_passes_preflight_with_its_own_data(llama_cache, compose, tmp_path):
    """model=llama stopped in preflight: 805 AlpacaEval prompts < 256 held out + 2000 per iteration, and
    the DeBERTa student's max_length 1024 > its 512 positions."""
    import tsalign.cli
    from tsalign.stages.checks import check_loop
    from tsalign.stages.lineage import training_prompts

    cfg = tsalign.cli.configure(compose(["model=llama", "stage=loop", "iterations=3",
                                         f"paths.outputs={tmp_path / 'outputs'}"]))
    check_loop(cfg)
    assert all(len(training_prompts(cfg, t)) == cfg.data.prompts_per_iteration for t in range(3))
    assert cfg.distill.max_length == cfg.student.max_length  # the student trains on what it scores


def test_the_llama_preset_takes_several_steps_per_iteration(compose):
    """8 processes x batch 8 x accumulation 8 = 512 pairs per step left ~4 DPO steps per iteration."""
    cfg = compose(["model=llama"])
    pairs_per_step = cfg.launch.processes * cfg.dpo.batch_size * cfg.dpo.gradient_accumulation_steps
    assert cfg.data.prompts_per_iteration * cfg.dpo.epochs / pairs_per_step >= 16


def test_the_loop_refuses_more_processes_than_gpus_before_any_stage(compose):
    from tsalign.stages.checks import check_launch

    cfg = compose(["model=llama"])
    with pytest.raises(TsalignError, match=r"launch.processes = 8 needs 8 GPUs and this node shows 4; .*launch.processes=4"):
        check_launch(cfg, gpus=4)
    check_launch(cfg, gpus=8)
    check_launch(cfg, gpus=0)  # a CPU node: gloo takes any count
    with pytest.raises(TsalignError, match="teacher.vllm.tensor_parallel_size = 4"):
        check_launch(compose(["model=llama", "teacher=llama3_70b_judge", "launch.processes=2",
                              "launch.generate_processes=2"]), gpus=2)


# ---------------------------------------------------------------- make gpu-check


def test_gpu_check_says_plainly_that_it_needs_a_gpu():
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and "gpu-check needs a CUDA GPU" in done.stdout


def test_gpu_check_reports_the_line_that_says_what_failed():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import last_error

    hydra_tail = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    assert last_error("loading\ntsalign: error: dpo.max_length=9000 is longer" + hydra_tail).startswith("tsalign: error")
    assert last_error("Traceback\n  File x\nImportError: cannot import name 'y'" + hydra_tail).startswith("ImportError")


# ---------------------------------------------------------------- settled "likely" items (see tests/test_gpu_likely.py too)


def test_deberta_with_relative_positions_reads_past_its_trained_length():
    """DeBERTa-v3 (position_biased_input false) has no absolute position table: 1024 tokens run (checked on a
    tiny DebertaV2 in tests/test_gpu_likely.py); with absolute positions 512 is a hard limit."""
    from tsalign.stages.checks import positions

    assert positions(DEBERTA_V3_LARGE) is None
    assert positions({**DEBERTA_V3_LARGE, "position_biased_input": True}) == 512
    assert positions(LLAMA_8B) == 131072


def test_fsdp_cpu_ram_efficient_loading_is_refused_for_full_dpo(compose):
    from tsalign.stages import dpo

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    with pytest.raises(TsalignError, match="reference zero-filled"):
        dpo.check_fsdp_loading(compose([]), env)
    dpo.check_fsdp_loading(compose([]), {**env, "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"})
    dpo.check_fsdp_loading(compose(["dpo.lora=true"]), env)  # LoRA: no separate reference


def test_a_lora_adapter_gathered_from_sharded_weights_is_merged_into_a_fresh_base(tmp_path, compose):
    """Under ZeRO-3 / FSDP the adapter is saved gathered (Trainer.save_model) and merged on the main process into
    the base loaded afresh: in place, PEFT would add into empty ZeRO-3 partitions (shape-[0] weights)."""
    from peft import LoraConfig, get_peft_model

    from tsalign.engines.models import load_causal_lm, load_tokenizer
    from tsalign.stages.lineage import base_model_dir
    from tsalign.training.divergence import largest_weight
    from tsalign.training.saving import merge_saved_adapter

    cfg = compose(["model=tiny", "dpo.lora=true"])
    base = base_model_dir(cfg, cfg.policy)
    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    adapter = tmp_path / ".policy.sharded.tmp"
    peft.save_pretrained(adapter)
    expected = peft.merge_and_unload().state_dict()
    out = tmp_path / "policy"
    merge_saved_adapter(adapter, base, load_tokenizer(base), out, cfg, True, largest_weight(load_causal_lm(base)))
    merged = load_causal_lm(out).state_dict()
    assert merged.keys() == expected.keys() and not adapter.exists()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in merged)
    assert any(not torch.equal(merged[k], v) for k, v in load_causal_lm(base).state_dict().items())
