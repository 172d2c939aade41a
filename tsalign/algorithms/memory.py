"""Resource arithmetic for `tsalign stage=plan` and tsalign.views.plan.check_fits: parameter counts from a
model's config.json, memory per device for training and for vLLM engines, optimizer steps per iteration.

Pure functions over dicts and numbers: no torch, no Hydra config, no files. Every figure is an estimate
of the *model states* (weights, gradients, optimizer states, a reference model, a KV cache); activations
are not counted, and tsalign.views.plan says so next to every training figure.

References for the training figures:
- DeepSpeed's estimators (deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs and
  deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs, documented under "Memory
  Requirements" in DeepSpeed's ZeRO docs): ZeRO-2 holds 4 bytes/param replicated (bf16 weights and
  gradients) plus 16 bytes/param sharded over the GPUs (fp32 master weights, Adam's two states, fp32
  gradients); ZeRO-3 shards 18 bytes/param and gathers the largest layer (4 bytes/param of it).
- accelerate's `accelerate estimate-memory` (accelerate.commands.estimate.estimate_training_usage): fp32
  training with Adam peaks at 4x the fp32 model size = 16 bytes/param (weights, gradients, 2 Adam states).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ADAM_STATES = 2  # AdamW keeps two fp32 states per trained parameter (exp_avg, exp_avg_sq)
FEW_STEPS = 10  # fewer optimizer steps per iteration than this and the learning-rate schedule hardly moves

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2")
STRATEGIES = ("single", "ddp", "zero2", "zero3", "fsdp")


class UnknownArchitecture(ValueError):
    """A config.json whose model_type this module cannot count parameters for."""


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (float32, bfloat16, float16)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


# ---------------------------------------------------------------- parameters from config.json


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _classifier_labels(config: dict, num_labels: int | None) -> int | None:
    """Outputs of a sequence-classification head, or None for a causal LM (lm_head instead)."""
    if num_labels is not None:
        return num_labels
    architectures = config.get("architectures") or []
    is_classifier = any("SequenceClassification" in a for a in architectures)
    is_encoder = config.get("model_type") in ENCODERS
    if not (is_classifier or is_encoder):
        return None
    # transformers derives num_labels from id2label when present; tsalign's reward models have one output
    return len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 1)


def decoder_layer_params(config: dict) -> int:
    """One Llama / Mistral / Qwen2 / Qwen3 decoder layer: attention (q/k/v/o, GQA through num_key_value_heads
    and head_dim), gated MLP (gate/up/down), two RMSNorms."""
    kind = config["model_type"]
    hidden, heads, head_dim, kv_heads = config["hidden_size"], config["num_attention_heads"], _head_dim(config), _kv_heads(config)
    qkv_bias = kind == "qwen2" or bool(config.get("attention_bias", False))  # Qwen2 always biases q/k/v
    o_bias = kind in ("llama", "mistral") and bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    attention = (_linear(hidden, heads * head_dim, qkv_bias) + 2 * _linear(hidden, kv_heads * head_dim, qkv_bias)
                 + _linear(heads * head_dim, hidden, o_bias))
    if kind == "qwen3":
        attention += 2 * head_dim  # q_norm and k_norm: RMSNorms over one head
    mlp = 2 * _linear(hidden, config["intermediate_size"], mlp_bias) + _linear(config["intermediate_size"], hidden, mlp_bias)
    return attention + mlp + 2 * hidden


def decoder_params(config: dict, num_labels: int | None = None) -> int:
    """A decoder LM: embedding, layers, final RMSNorm, then an lm_head (none when tie_word_embeddings: it is
    the embedding) or, for *ForSequenceClassification, a bias-free score head of num_labels outputs."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    body = vocab * hidden + config["num_hidden_layers"] * decoder_layer_params(config) + hidden
    labels = _classifier_labels(config, num_labels)
    if labels is not None:
        return body + hidden * labels
    return body + (0 if config.get("tie_word_embeddings", False) else vocab * hidden)


def _bert_layer_params(config: dict) -> int:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    return 4 * _linear(hidden, hidden, True) + _linear(hidden, inner, True) + _linear(inner, hidden, True) + 4 * hidden


def bert_params(config: dict, num_labels: int | None = None) -> int:
    """BERT / MiniLM (and RoBERTa, whose classifier is a dense layer + out_proj instead of pooler + head) as a
    sequence classifier: word, position and token-type embeddings + LayerNorm, layers, pooler, head."""
    hidden = config["hidden_size"]
    labels = _classifier_labels(config, num_labels) or 1
    embeddings = (config["vocab_size"] + config.get("max_position_embeddings", 512) + config.get("type_vocab_size", 2)) \
        * hidden + 2 * hidden
    body = embeddings + config["num_hidden_layers"] * _bert_layer_params(config)
    # BertForSequenceClassification: pooler (dense) + classifier; RobertaForSequenceClassification: no pooler,
    # a head of dense + out_proj: the same count
    return body + _linear(hidden, hidden, True) + _linear(hidden, labels, True)


def deberta_v2_params(config: dict, num_labels: int | None = None) -> int:
    """DeBERTa-v2 / v3 as DebertaV2ForSequenceClassification: word embeddings (+ position embeddings only when
    position_biased_input, + token types when type_vocab_size > 0), layers (q/k/v with bias, plus
    pos_key/pos_query projections unless share_att_key), relative position embeddings and their LayerNorm,
    an optional conv layer, the ContextPooler and the head (defaults: transformers' DebertaV2Config)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    embedding = config.get("embedding_size") or hidden
    labels = _classifier_labels(config, num_labels) or 1
    positions = config.get("max_position_embeddings", 512)
    total = config["vocab_size"] * embedding + 2 * hidden  # word embeddings + LayerNorm
    total += positions * embedding if config.get("position_biased_input", True) else 0
    total += config.get("type_vocab_size", 0) * embedding
    total += embedding * hidden if embedding != hidden else 0  # embed_proj, no bias
    layer = _bert_layer_params(config)
    pos_att = config.get("pos_att_type") or []
    pos_att = [p.strip() for p in pos_att.lower().split("|")] if isinstance(pos_att, str) else list(pos_att)
    relative = bool(config.get("relative_attention", False))
    if relative and not config.get("share_att_key", False):
        layer += _linear(hidden, hidden, True) * (("c2p" in pos_att) + ("p2c" in pos_att))
    total += layers * layer
    if relative:
        max_relative = config.get("max_relative_positions", -1)
        max_relative = max_relative if max_relative >= 1 else positions
        buckets = config.get("position_buckets", -1)
        total += (buckets if buckets > 0 else max_relative) * 2 * hidden
    if "layer_norm" in str(config.get("norm_rel_ebd", "none")).lower():
        total += 2 * hidden
    kernel = config.get("conv_kernel_size", 0)
    if kernel > 0:
        groups = config.get("conv_groups", 1)
        total += hidden * (hidden // groups) * kernel + hidden + 2 * hidden  # conv + LayerNorm
    pooler = config.get("pooler_hidden_size") or hidden
    return total + _linear(pooler, pooler, True) + _linear(pooler, labels, True)


def param_count(config: dict, num_labels: int | None = None) -> int:
    """Parameters of the model a config.json describes, read from the config alone (no weights), as
    transformers builds it: a causal LM (lm_head, or none when tied), a *ForSequenceClassification with a
    score head, or an encoder as a sequence classifier. `num_labels` forces a classification head of that
    many outputs (tsalign loads every reward model with one). Tied parameters count once, as in
    sum(p.numel() for p in model.parameters())."""
    kind = config.get("model_type")
    if kind in DECODERS:
        return decoder_params(config, num_labels)
    if kind in ("bert", "roberta", "xlm-roberta"):
        return bert_params(config, num_labels)
    if kind == "deberta-v2":
        return deberta_v2_params(config, num_labels)
    raise UnknownArchitecture(f"model_type {kind!r}: parameters counted for {', '.join(DECODERS + ENCODERS)}")


def largest_layer_params(config: dict) -> int:
    """Parameters of the largest single module (DeepSpeed's `largest_layer_params`, what ZeRO-3 gathers at
    once): for these models the word embedding or the lm_head, else an MLP projection."""
    hidden = config["hidden_size"]
    return max(config["vocab_size"] * (config.get("embedding_size") or hidden), hidden * config["intermediate_size"])


def lora_param_count(config: dict, r: int, target_modules: Sequence[str]) -> int:
    """Adapter parameters PEFT adds to a decoder: r x (in + out) for every targeted projection in every layer
    (LoRA's A is r x in, B is out x r). Targets are matched by the projection's name (q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj); other names add nothing here."""
    hidden, heads, head_dim, kv = config["hidden_size"], config["num_attention_heads"], _head_dim(config), _kv_heads(config)
    inner = config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    per_layer = sum(r * sum(shapes[name]) for name in set(target_modules) if name in shapes)
    return config["num_hidden_layers"] * per_layer


def kv_bytes_per_token(config: dict, dtype: str, tensor_parallel_size: int = 1) -> int:
    """KV cache bytes per token on one GPU: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes, the KV
    heads split over tensor_parallel_size GPUs (vLLM replicates them when there are fewer heads than GPUs)."""
    heads_per_gpu = max(1, _kv_heads(config) // tensor_parallel_size)
    return 2 * config["num_hidden_layers"] * heads_per_gpu * _head_dim(config) * dtype_bytes(dtype)


def context_length(config: dict) -> int | None:
    """The model's positions (max_position_embeddings), what vLLM takes as max_model_len when none is set."""
    found = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(found) if found else None


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    """Bytes per device, by what holds them, in the order they print; `notes` say what is not counted."""

    parts: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def without(self, *names: str) -> Memory:
        return Memory({k: v for k, v in self.parts.items() if k not in names}, self.notes)

    def describe(self) -> str:
        """e.g. 'weights 29.9 + gradients 29.9 + optimizer states 59.8 GiB'"""
        return " + ".join(f"{k} {gib(v):.1f}" for k, v in self.parts.items() if v) + " GiB"


@dataclass(frozen=True)
class Launch:
    """How training processes share the model: one process, DDP (replicas), DeepSpeed ZeRO-2 / ZeRO-3, or FSDP
    full shard, over `processes`; DeepSpeed may offload optimizer states (and ZeRO-3 parameters) to the CPU."""

    strategy: str = "single"
    processes: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: one of {', '.join(STRATEGIES)}")
        if self.processes < 1:
            raise ValueError(f"processes={self.processes} must be >= 1")

    @property
    def sharded_params(self) -> bool:
        return self.strategy in ("zero3", "fsdp")


ACTIVATIONS = "activations not counted"


def _replicated_or_sharded(n_bytes: int, launch: Launch) -> int:
    return n_bytes // launch.processes if launch.sharded_params else n_bytes


def full_training_memory(params: int, launch: Launch, *, trained_dtype: str = "float32", reference_params: int = 0,
                         reference_dtype: str = "bfloat16", largest_layer: int = 0) -> Memory:
    """Full fine-tuning with AdamW, per device. tsalign's full DPO holds fp32 master weights (bf16 only as
    autocast, trained_dtype): one process or DDP holds 4 (weights) + 4 (gradients, in the trained dtype) + 8
    (2 fp32 Adam states) = 16 bytes/param, accelerate estimate-memory's fp32 figure. DeepSpeed casts the model to bf16 and keeps the fp32 copies in
    its optimizer: ZeRO-2 = 4 bytes/param replicated + 16 sharded (estimate_zero2_model_states_mem_needs),
    ZeRO-3 = 18 bytes/param sharded + 4 x the largest layer gathered (estimate_zero3_model_states_mem_needs);
    offloading moves the sharded states to the CPU as those estimators do. FSDP full shard keeps the loaded
    fp32 parameters as shards (bf16 only for compute): 16 bytes/param sharded + the largest layer gathered
    in bf16 with its gradient, ZeRO-3's allowance. The reference model (reference_params, 0 = none) is held
    in reference_dtype, replicated, or sharded under ZeRO-3 / FSDP (TRL prepares it with the policy's
    engine; under ZeRO-2 it runs unsharded)."""
    p, n, s, held = params, launch.processes, launch.strategy, dtype_bytes(trained_dtype)
    if s in ("single", "ddp"):
        parts = {"weights": held * p, "gradients": held * p, "optimizer states": 4 * ADAM_STATES * p}
    elif s == "zero2":
        if launch.offload_optimizer:  # estimate_zero2_model_states_mem_needs(cpu_offload=True): 2 B/param on the GPU
            parts = {"weights": 2 * p, "gradients": 0, "optimizer states": 0}
        else:  # bf16 weights and gradients replicated; fp32 master weights and gradients, Adam states sharded
            parts = {"weights": 2 * p + 4 * p // n, "gradients": 2 * p + 4 * p // n, "optimizer states": 8 * p // n}
    elif s == "zero3":
        on_gpu = not launch.offload_optimizer
        weights = 0 if launch.offload_params else 2 * p // n
        parts = {"weights": weights + (4 * p // n if on_gpu else 0), "gradients": 4 * p // n if on_gpu else 0,
                 "optimizer states": 8 * p // n if on_gpu else 0, "gathered layer": 4 * largest_layer}
    else:  # fsdp
        parts = {"weights": held * p // n, "gradients": held * p // n, "optimizer states": 8 * p // n,
                 "gathered layer": 4 * largest_layer}
    if reference_params:
        parts["reference"] = _reference_bytes(reference_params, reference_dtype, launch)
    return Memory(parts, (ACTIVATIONS,))


def _reference_bytes(params: int, dtype: str, launch: Launch) -> int:
    if launch.strategy == "zero3" and launch.offload_params:
        return 0
    return _replicated_or_sharded(params * dtype_bytes(dtype), launch)


def lora_training_memory(params: int, adapter_params: int, launch: Launch, *, base_dtype: str = "bfloat16",
                         reference_params: int = 0, reference_dtype: str = "bfloat16", largest_layer: int = 0) -> Memory:
    """LoRA, per device: the frozen base in base_dtype (replicated, or sharded under ZeRO-3 / FSDP, with its
    largest layer gathered), the adapter in fp32 with fp32 gradients and 2 Adam states (16 bytes/param; the
    adapter is small, so sharding its states is not worth counting). No separate reference: TRL disables the
    adapter for the reference pass, unless a reference is loaded explicitly (reference_params, e.g.
    dpo.reference=initial)."""
    base = _replicated_or_sharded(params * dtype_bytes(base_dtype), launch)
    if launch.strategy == "zero3" and launch.offload_params:
        base = 0
    gathered = largest_layer * dtype_bytes(base_dtype) if launch.sharded_params else 0
    parts = {"weights": base + 4 * adapter_params, "gradients": 4 * adapter_params,
             "optimizer states": 4 * ADAM_STATES * adapter_params}
    if gathered:
        parts["gathered layer"] = gathered
    if reference_params:
        parts["reference"] = _reference_bytes(reference_params, reference_dtype, launch)
    return Memory(parts, (ACTIVATIONS,))


def inference_memory(params: int, dtype: str, kv_tokens: int = 0, kv_per_token: int = 0) -> Memory:
    """A model loaded with transformers to score or sample: its weights, and for a sampler the KV cache of
    the sequences it generates at once (kv_tokens x kv_per_token)."""
    parts = {"weights": params * dtype_bytes(dtype)}
    if kv_tokens:
        parts["KV cache"] = kv_tokens * kv_per_token
    return Memory(parts, (ACTIVATIONS,))


@dataclass(frozen=True)
class EngineMemory:
    """A vLLM engine on each of its tensor_parallel_size GPUs. On a GPU vLLM reserves gpu_memory_utilization x
    the device's memory and fills what the weights leave with KV cache (unless kv_cache_bytes fixes it); it
    refuses to start unless that cache holds one full max_model_len sequence."""

    weights: int  # bytes per GPU: params x dtype bytes / tensor_parallel_size
    reserved: int | None  # bytes per GPU the engine takes (None: device memory unknown)
    kv_cache: int | None  # bytes per GPU left for KV cache (None: unknown)
    kv_per_token: int  # bytes per token per GPU
    kv_tokens: int | None  # tokens of KV cache that fit (None: unknown)
    max_model_len: int
    needed: int  # device memory per GPU this engine needs to start (weights + one max_model_len of KV)
    gpus: int = 1
    utilization: float | None = None  # gpu_memory_utilization, when it sizes the engine (no fixed KV cache)
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.needed


def vllm_engine_memory(params: int, dtype: str, *, kv_per_token: int, max_model_len: int, tensor_parallel_size: int = 1,
                       gpu_memory_utilization: float = 0.9, device_bytes: int | None = None,
                       kv_cache_bytes: int | None = None) -> EngineMemory:
    """Weights = params x dtype bytes / tensor_parallel_size per GPU. Without kv_cache_bytes the engine reserves
    gpu_memory_utilization x device_bytes and the KV cache is what the weights leave of it (CUDA graphs and
    activations not counted); the device memory it needs is (weights + KV for one max_model_len sequence) /
    gpu_memory_utilization. With kv_cache_bytes (vLLM's kv_cache_memory_bytes: tsalign's kv_cache_gib, 2 GiB on
    CPU) the engine holds weights + that cache, which must hold one max_model_len sequence."""
    weights = params * dtype_bytes(dtype) // tensor_parallel_size
    one_sequence = max_model_len * kv_per_token
    if kv_cache_bytes is not None:
        reserved, kv = weights + kv_cache_bytes, kv_cache_bytes
        needed = weights + max(kv_cache_bytes, one_sequence)
    else:
        reserved = int(gpu_memory_utilization * device_bytes) if device_bytes else None
        kv = max(reserved - weights, 0) if reserved is not None else None
        needed = math.ceil((weights + one_sequence) / gpu_memory_utilization)
    tokens = kv // kv_per_token if kv is not None and kv_per_token else None
    return EngineMemory(weights, reserved, kv, kv_per_token, tokens, max_model_len, needed, tensor_parallel_size,
                        None if kv_cache_bytes is not None else gpu_memory_utilization,
                        ("CUDA graphs and activations not counted",))


# ---------------------------------------------------------------- steps


def max_pairs(prompts: int) -> int:
    """Preference pairs one iteration can mine: at most one per prompt. rank's decide() makes one (chosen,
    rejected) pair per prompt from the shortlist whatever rank.selection, top_bottom's 2m candidates included;
    ties, cut answers and a teacher budget make fewer."""
    return max(prompts, 0)


def dpo_steps(pairs: int, batch_size: int, gradient_accumulation_steps: int, processes: int, epochs: float,
              max_steps: int = -1) -> int:
    """Optimizer steps of TRL's DPOTrainer (transformers' Trainer): each process reads ceil(pairs / (batch_size x
    processes)) batches per epoch, one step per gradient_accumulation_steps of them (at least 1), times
    epochs (rounded up); max_steps > 0 replaces that."""
    if max_steps > 0:
        return max_steps
    if pairs <= 0:
        return 0
    batches = math.ceil(pairs / (batch_size * processes))
    per_epoch = max(math.ceil(batches / gradient_accumulation_steps), 1)
    return math.ceil(epochs * per_epoch)


def distill_steps(pairs: int, batch_size: int, epochs: int) -> int:
    """Steps of tsalign's reward-model loop (tsalign.training.reward_model): distill.batch_size is the global batch,
    sliced across processes, so the step count does not depend on them: ceil(pairs / batch_size) x epochs."""
    return math.ceil(max(pairs, 0) / batch_size) * epochs


def few_steps(steps: int) -> str | None:
    """A plain warning when an iteration trains for fewer than FEW_STEPS optimizer steps."""
    if steps >= FEW_STEPS:
        return None
    return (f"only {steps} optimizer step{'s' * (steps != 1)} per iteration (fewer than {FEW_STEPS}): warmup and "
            "the learning-rate schedule barely run; more prompts, a smaller batch or more epochs give more")
