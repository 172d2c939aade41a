"""`make gpu-check`: the acceptance run for the first CUDA machine (issue 22), under 10 minutes.

    make gpu-check                                              # the embedded SmolLM2 models
    python benchmarks/gpu_check.py --set policy.path=/m/policy --set policy.tiny=null ...   # other models

On one or more CUDA GPUs: an NCCL collective with tsalign's tensors; the pipeline's stages one by one
(generate with vLLM, rank with a vLLM judge teacher, distill, DPO with bf16 autocast, evaluate); with
2+ GPUs dpo and distill under `accelerate launch` with DDP and DeepSpeed ZeRO-3 and a data-parallel
generate; then `tsalign stage=plan model=llama` against the devices it sees. One line per check
(PASS / FAIL with the reason), with tokens/s, s/step and the peak GPU memory measured beside what
`stage=plan` predicted for the same overrides. Without a CUDA GPU it says so and exits 2.
Results: <outputs>/gpu_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 1024**3
# small sizes: each stage runs for real, the whole check stays under 10 minutes on one GPU
SIZES = ["data.prompts_per_iteration=16", "data.eval_prompts=16", "generate.num_candidates=4",
         "sampler.max_new_tokens=128", "dpo.max_steps=4", "dpo.save_steps=100", "rank.selection=best_worst"]


class GpuMemory:
    """Peak memory used on any GPU while a command runs, read from nvidia-smi every 0.2 s: it sees every
    process (vLLM's engine core and training processes alike), which torch's own counters do not."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()

    def _read(self) -> list[int]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout
        return [int(x) for x in out.split() if x.strip().isdigit()]

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max([self.peak_mib, *self._read()])
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True) if shutil.which("nvidia-smi") else None
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return round(self.peak_mib / 1024, 1) if self._thread else None


class Checks:
    """Runs commands, prints one line per check, keeps every result for gpu_check.json."""

    def __init__(self, outputs: Path, overrides: list[str]):
        self.outputs, self.overrides, self.results = outputs, overrides, []

    def line(self, name: str, ok: bool | None, detail: str, **figures) -> bool:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        print(f"{status}  {name}: {detail}", flush=True)
        self.results.append({"check": name, "status": status, "detail": detail, **figures})
        return bool(ok)

    def tsalign(self, *args: str, launcher: list[str] | None = None, timeout: int = 300, env: dict | None = None):
        """`tsalign <args>` (under `launcher` if given) with the common overrides; (exit code, output, peak GiB)."""
        cmd = [*(launcher or [sys.executable]), "-m", "tsalign.cli", *SIZES, "experiment_name=gpu_check",
               f"paths.outputs={self.outputs}", *self.overrides, *args]
        log = self.outputs / "logs" / (hashlib.sha1(" ".join(cmd).encode()).hexdigest()[:8] + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with GpuMemory() as memory:
            try:
                done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                      timeout=timeout, check=False)
                code, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as e:
                code, output = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s"
        log.write_text(" ".join(cmd) + "\n\n" + (output if isinstance(output, str) else output.decode()))
        return code, output, memory.peak_gib

    def manifest(self, stage: str) -> dict:
        path = self.outputs / "gpu_check" / "iter_0" / stage / "manifest.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def last_error(output: str) -> str:
    """The line that says what went wrong: tsalign's own, else the exception's, else the last one."""
    lines = [x.strip() for x in output.strip().splitlines() if x.strip() and not x.startswith("Set the environment")]
    own = [x for x in lines if x.startswith("tsalign: error")]
    raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", x)]
    return (own or raised or lines or ["no output"])[-1][:300]


def installed(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"vllm": "vllm", "deepspeed": "deepspeed"}[module])
    except PackageNotFoundError:
        return "installed"


def environment(checks: Checks, torch) -> int:
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True, check=False).stdout.split("\n")[0].strip() if shutil.which("nvidia-smi") else "?"
    names = ", ".join(f"{g.name} {g.total_memory / GIB:.0f} GiB" for g in gpus)
    checks.line("environment", True, f"{len(gpus)} GPU(s): {names}; driver {driver}; torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}), bf16 {torch.cuda.is_bf16_supported()}; vllm {installed('vllm')}; "
                f"deepspeed {installed('deepspeed')}", gpus=len(gpus), driver=driver, torch=torch.__version__)
    return len(gpus)


NCCL_PROBE = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
from tsalign.distributed import collective_device
t = torch.tensor([1.0, 2.0], dtype=torch.float64, device=collective_device())
dist.all_reduce(t)
try:
    dist.all_reduce(torch.tensor([1.0]))
    cpu = "accepted"
except Exception as e:
    cpu = "refused (" + str(e).splitlines()[0][:80] + ")"
print("OK", collective_device(), "sum", t.tolist(), "| a CPU tensor:", cpu)
dist.destroy_process_group()
"""


def nccl(checks: Checks) -> None:
    done = subprocess.run([sys.executable, "-c", NCCL_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    out = done.stdout.strip().splitlines()
    ok = done.returncode == 0 and bool(out) and out[-1].startswith("OK")
    checks.line("nccl collective on the process's device", ok, out[-1] if ok else last_error(done.stdout + done.stderr))


def predicted(overrides: list[str]) -> dict[str, float]:
    """stage=plan's estimate (GiB per device) for each stage under the same overrides, or {} if unavailable."""
    try:
        import hydra
        from omegaconf import OmegaConf

        import tsalign.cli
        from tsalign.config.schema import register_configs
        from tsalign.stages.placement import target_of
        from tsalign.stages.resource_plan import STAGE_PLANS

        register_configs()
        with hydra.initialize_config_dir(config_dir=tsalign.cli.CONF_DIR, version_base="1.3"):
            cfg = hydra.compose("config", [*SIZES, *overrides])
        OmegaConf.set_readonly(cfg, False)
        tsalign.cli.configure(cfg)
        target = target_of(cfg)
        sizes = {stage: STAGE_PLANS[stage](cfg, target).per_device for stage in STAGE_PLANS}
        return {stage: round(size / GIB, 1) for stage, size in sizes.items() if size is not None}
    except Exception as e:  # noqa: BLE001 -- the plan's figure is context for the check, never its verdict
        print(f"      (no plan estimate: {type(e).__name__}: {e})")
        return {}


def engine_overrides(has_vllm: bool, overrides: list[str]) -> list[str]:
    """A judge teacher (SmolLM2 unless --set teacher=...), both engines on vLLM when it is installed."""
    judge = [] if any(o.startswith("teacher=") for o in overrides) else ["teacher=smollm2_judge"]
    return [*judge, *(["sampler=vllm", "teacher.vllm.enabled=true"] if has_vllm else ["sampler=hf"])]


def pipeline(checks: Checks, has_vllm: bool, engines: list[str], plan: dict[str, float]) -> None:
    """Each stage of one iteration, in order, on one GPU: a failed stage fails the ones after it too.
    Every stage gets the same overrides: the stages' config hashes must agree across the iteration."""
    why_not = "" if has_vllm else " (vllm is not installed: transformers instead, so this is no vLLM check)"
    steps = [("generate", lambda m: f"{m['counts'].get('tokens_per_s')} tok/s, engine "
              f"{m['config']['sampler']['backend']}, load {m['counts'].get('model_load_s')} s"),
             ("rank", lambda m: f"{m['counts'].get('pairs')} pairs from {m['counts'].get('teacher_calls')} "
              "judge calls"),
             ("distill", lambda m: f"{m['counts'].get('steps')} steps, agreement "
              f"{m['counts'].get('agreement_before')} -> {m['counts'].get('agreement_after')}"),
             ("dpo", lambda m: f"{m['counts'].get('s_per_step')} s/step on {m.get('device')}, reference "
              f"{m.get('reference_dtype')}, loss {m['counts'].get('first_loss')} -> {m['counts'].get('last_loss')}"),
             ("evaluate", lambda m: f"win rate {m['counts'].get('win_rate')} on {m['counts'].get('n')} prompts, "
              f"control {m['counts'].get('control_win_rate')}")]
    for stage, figures in steps:
        code, output, peak = checks.tsalign(f"stage={stage}", "iteration=0", *engines)
        expected = plan.get(stage)
        memory = f"; peak GPU {peak} GiB (plan {expected} GiB)" if peak is not None else ""
        name = f"{stage}{why_not if stage in ('generate', 'rank', 'evaluate') else ''}"
        if code != 0:
            checks.line(name, False, f"exit {code}: {last_error(output)}{memory}", peak_gib=peak, plan_gib=expected)
            return
        m = checks.manifest(stage)
        checks.line(name, has_vllm or stage in ("distill", "dpo"), figures(m) + memory, peak_gib=peak,
                    plan_gib=expected, counts=m.get("counts"))


def launched(checks: Checks, gpus: int) -> None:
    """dpo and distill under accelerate launch (DDP, ZeRO-3) and a 2-process generate, on 2 GPUs."""
    if gpus < 2:
        checks.line("accelerate launch (DDP, ZeRO-3, data-parallel generate)", None, f"needs 2+ GPUs, {gpus} visible")
        return
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    configs = [("ddp", REPO / "conf/accelerate/ddp.yaml")]
    if installed("deepspeed"):
        configs.append(("deepspeed_zero3", REPO / "conf/accelerate/deepspeed_zero3.yaml"))
    else:
        checks.line("deepspeed_zero3", False, "deepspeed is not installed (the deepspeed extra)")
    for name, config in configs:
        for stage in ("distill", "dpo"):
            launcher = [*accelerate, "--config_file", str(config), "--num_processes", "2"]
            code, output, peak = checks.tsalign(f"stage={stage}", "iteration=0", "redo=true", launcher=launcher)
            m = checks.manifest(stage)
            detail = (f"{m['counts'].get('s_per_step', m['counts'].get('steps'))} (s/step or steps), peak GPU {peak} GiB"
                      if code == 0 else f"exit {code}: {last_error(output)}")
            checks.line(f"{stage} under accelerate {name} x2", code == 0, detail, peak_gib=peak)
    code, output, peak = checks.tsalign("stage=generate", "iteration=0", "redo=true",
                                        "sampler=vllm" if installed("vllm") else "sampler=hf",
                                        launcher=[*accelerate, "--multi_gpu", "--num_processes", "2"])
    m = checks.manifest("generate")
    checks.line("generate data-parallel x2", code == 0, f"{m['counts'].get('tokens_per_s')} tok/s over "
                f"{m['counts'].get('processes')} processes" if code == 0 else f"exit {code}: {last_error(output)}")


LLAMA_SHAPES = {  # config.json shapes of the llama preset's models, for a plan when they are not downloaded
    "meta-llama/Llama-3.1-8B-Instruct": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                         "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                         "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "OpenAssistant/reward-model-deberta-v3-large-v2": {
        "architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2", "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "vocab_size": 128100,
        "max_position_embeddings": 512, "position_biased_input": False, "relative_attention": True,
        "type_vocab_size": 0, "num_labels": 1},
}
LLAMA_SHAPES["Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"] = {
    **LLAMA_SHAPES["meta-llama/Llama-3.1-8B-Instruct"], "architectures": ["LlamaForSequenceClassification"],
    "num_labels": 1}


def shapes_cache(root: Path) -> Path:
    """An HF cache holding only the config.json of each llama-preset model (no weights)."""
    for repo_id, config in LLAMA_SHAPES.items():
        folder = root / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / commit / "config.json").write_text(json.dumps(config))
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return root


def llama_plan(checks: Checks) -> None:
    from huggingface_hub import try_to_load_from_cache

    missing = [r for r in LLAMA_SHAPES if not isinstance(try_to_load_from_cache(r, "config.json"), str)]
    env = {"HF_HUB_CACHE": str(shapes_cache(Path(tempfile.mkdtemp(prefix="tsalign-shapes-"))))} if missing else {}
    done = subprocess.run([sys.executable, "-m", "tsalign.cli", "stage=plan", "model=llama"], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False)
    lines = [x for x in done.stdout.splitlines() if "fit" in x.lower()]
    source = "config.json shapes written by this check (models not downloaded)" if missing else "the local HF cache"
    checks.line("stage=plan model=llama", done.returncode == 0, (" | ".join(lines[-6:]) or last_error(done.stderr))
                + f" [{source}]")
    print(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a tsalign override for every run (e.g. model paths on a machine without the packages)")
    parser.add_argument("--outputs", default=str(REPO / "outputs" / "_gpu_check"))
    parser.add_argument("--keep", action="store_true", help="keep earlier gpu_check outputs (default: start clean)")
    parser.add_argument("--smoke-on-cpu", action="store_true",
                        help="exercise this script's checks on a CPU (device=cpu): tests the script, accepts nothing")
    args = parser.parse_args()

    import torch

    if args.smoke_on_cpu:
        print("smoke run on the CPU: a test of this script, not an acceptance (GPU-only checks fail or skip)")
    elif not torch.cuda.is_available():
        print(f"gpu-check needs a CUDA GPU, and none is visible here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False): run it on a GPU machine.")
        return 2
    outputs = Path(args.outputs)
    if not args.keep:
        shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True, exist_ok=True)
    overrides = ["device=cpu" if args.smoke_on_cpu else "device=cuda", *args.set]
    checks, t0 = Checks(outputs, overrides), time.time()
    gpus = environment(checks, torch) if torch.cuda.is_available() else 0
    if gpus:
        nccl(checks)
    has_vllm = installed("vllm") is not None
    if not has_vllm:
        checks.line("vllm", False, "not installed: the vllm extra (CUDA build); sampler and judge fall back to "
                    "transformers below")
    engines = engine_overrides(has_vllm, overrides)
    pipeline(checks, has_vllm, engines, predicted([*overrides, *engines]))
    launched(checks, gpus)
    llama_plan(checks)
    failed = [r["check"] for r in checks.results if r["status"] == "FAIL"]
    (outputs / "gpu_check.json").write_text(json.dumps({"results": checks.results, "wall_s": round(time.time() - t0)},
                                                       indent=1))
    print(f"gpu-check: {len(checks.results) - len(failed)} of {len(checks.results)} passed or skipped in "
          f"{time.time() - t0:.0f} s; failed: {', '.join(failed) or 'none'}; details {outputs / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
