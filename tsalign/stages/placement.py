"""Where a stage runs, read before anything loads: the GPUs this process sees (nvidia-smi, without starting CUDA),
the host's memory, the dtype a model is loaded in there, and the launch that dpo / distill get (a running
`accelerate launch`, or what stage=loop starts from launch.processes and launch.accelerate_config).
tsalign.stages.resource_plan plans each stage's memory for such a target.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from tsalign.algorithms.memory import Launch
from tsalign.config.options import accelerate_config_file

Device = tuple[str, int]  # (name, total bytes)


# ---------------------------------------------------------------- devices


def visible_gpus() -> list[Device]:
    """(name, total bytes) of every CUDA GPU this process sees; [] without CUDA. Read with nvidia-smi where it
    can be: torch's device properties start CUDA in this process, which would hold memory on GPU 0 for the
    whole loop and fix the visible devices before a training stage narrows them (tsalign.distributed)."""
    try:
        import torch
    except ImportError:
        return []
    count = torch.cuda.device_count()  # NVML: no CUDA context; 0 where torch cannot use the GPUs (CPU build, old driver)
    if count == 0:
        return []
    listed = nvidia_smi_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if listed is not None and len(listed) == count:
        return listed
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory) for i in range(count)]


def nvidia_smi_gpus(visible: str | None) -> list[Device] | None:
    """The GPUs nvidia-smi lists, narrowed to CUDA_VISIBLE_DEVICES (indices or UUIDs); None where it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [[field.strip() for field in line.split(",")] for line in out.strip().splitlines()]
        gpus = {(index, uuid): (name, int(float(mib)) * 1024**2) for index, uuid, name, mib in rows}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if visible is None:
        return list(gpus.values())
    picked = []
    for wanted in (w.strip() for w in visible.split(",") if w.strip()):
        match = [gpu for (index, uuid), gpu in gpus.items() if wanted in (index, uuid) or uuid.startswith(wanted)]
        if len(match) != 1:
            return None  # MIG slices and other forms: leave it to torch
        picked.append(match[0])
    return picked


def host_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """MemTotal in bytes, or None where /proc/meminfo does not say."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Target:
    """What a plan is for: CUDA GPUs (visible ones, or device=cuda on a machine without them) or the CPU;
    `environ` is where a running `accelerate launch` is read from."""

    gpu: bool
    gpus: tuple[Device, ...] = ()
    host_bytes: int | None = None
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def device_bytes(self) -> int | None:
        """Memory of the device each process gets: the smallest visible GPU, or host RAM on a CPU run."""
        if self.gpus:
            return min(total for _, total in self.gpus)
        return None if self.gpu else self.host_bytes


def target_of(cfg: DictConfig, gpus: Sequence[Device] | None = None) -> Target:
    """The devices cfg.device picks: visible GPUs unless device=cpu; device=cuda plans for GPUs even where
    none is visible (a login node planning a GPU job)."""
    gpus = [] if str(cfg.device) == "cpu" else visible_gpus() if gpus is None else list(gpus)
    gpu = bool(gpus) or str(cfg.device) == "cuda"
    return Target(gpu, tuple(gpus), None if gpus else host_memory(), dict(os.environ))


def loaded_dtype(dtype: str, target: Target) -> str:
    """The dtype transformers loads a model in (tsalign.engines.models.torch_dtype): float32 on a CPU whatever is
    configured; 'auto' is bfloat16 on a GPU."""
    if not target.gpu:
        return "float32"
    return "bfloat16" if dtype == "auto" else dtype


def engine_dtype(dtype: str, config: dict) -> str:
    """A vLLM engine's dtype: as configured; 'auto' is the checkpoint's bf16, else float16 (vLLM's rule)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else "float16"


# ---------------------------------------------------------------- launch


def _launched_from(environ: Mapping[str, str]) -> tuple[Launch, str] | None:
    """The running `accelerate launch` (its environment) this process belongs to, or None."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        stage = int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        launch = Launch("zero3" if stage == 3 else "zero2" if stage else "ddp", world,
                        environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", ""),
                        environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") not in ("none", ""))
        return launch, f"DeepSpeed ZeRO-{stage} over {world} processes (this accelerate launch)"
    if environ.get("ACCELERATE_USE_FSDP") == "true":
        return Launch("fsdp", world), f"FSDP over {world} processes (this accelerate launch)"
    if world > 1:
        return Launch("ddp", world), f"DDP over {world} processes (this accelerate launch)"
    return None


def accelerate_launch(config: dict, processes: int, label: str) -> tuple[Launch, str]:
    """Launch of an accelerate config file's contents: distributed_type MULTI_GPU (DDP), DEEPSPEED
    (deepspeed_config.zero_stage, offload devices) or FSDP; `processes` over its num_processes when > 1."""
    n = processes if processes > 1 else int(config.get("num_processes") or 1)
    kind = str(config.get("distributed_type", "MULTI_GPU")).upper()
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 2))
        offload = [str(ds.get(k) or "none").lower() != "none" for k in ("offload_optimizer_device", "offload_param_device")]
        # ZeRO-1 shards the optimizer only: counted as ZeRO-2 (a little low); ZeRO-0 replicates like DDP
        launch = Launch("zero3" if stage == 3 else "zero2" if stage else ("ddp" if n > 1 else "single"), n, *offload)
        return launch, f"{label}: DeepSpeed ZeRO-{stage} over {n} process{'es' * (n > 1)}"
    if kind == "FSDP":
        return Launch("fsdp", n), f"{label}: FSDP full shard over {n} process{'es' * (n > 1)}"
    return Launch("ddp" if n > 1 else "single", n), f"{label}: DDP over {n} process{'es' * (n > 1)}"


def training_launch(cfg: DictConfig, target: Target) -> tuple[Launch, str]:
    """How dpo / distill run: inside a running `accelerate launch`, its settings; else what stage=loop starts
    from launch.processes and launch.accelerate_config (tsalign.pipeline.loop.stage_launcher: with a config
    file and launch.processes <= 1, the file's num_processes)."""
    running = _launched_from(target.environ)
    if running:
        return running
    launch = cfg.launch
    if launch.accelerate_config:
        import yaml  # PyYAML, which Hydra and OmegaConf install

        path = accelerate_config_file(launch.accelerate_config)
        return accelerate_launch(yaml.safe_load(path.read_text()) or {}, launch.processes,
                                 f"launch.accelerate_config={launch.accelerate_config}")
    if launch.processes > 1:
        return Launch("ddp", launch.processes), f"DDP over {launch.processes} processes (launch.processes)"
    return Launch(), "1 process"
