"""The machine a speed figure was measured on: CPU model, the instruction sets that decide which kernels run
(vLLM-CPU's fast path needs AVX-512, its bf16 path AVX512_BF16 or AMX), cores and torch threads. Generate records it
beside its tokens/s, and the benchmarks print it: a tok/s figure without its machine cannot be compared.

    python -m tsalign.engines.machine        # one line, as the manifests record it
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# the flags that change which CPU kernels torch, oneDNN and vLLM-CPU use, in the order they are shown
ISA = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
# the libraries' own switches that keep their kernels below what the CPU has (torch's ATen dispatch, oneDNN): with one
# set to AVX2, the AVX-512 and AMX flags pick nothing (benchmarks/avx2_kernels runs a command that way)
BELOW_AVX512 = {  # per switch, its values under AVX-512 (oneDNN's DEFAULT means no limit, ATen's means no SIMD)
    "ATEN_CPU_CAPABILITY": {"default", "avx2"},
    "ONEDNN_MAX_CPU_ISA": {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2"},
}


def isa_limit(env=os.environ) -> str | None:
    """`ONEDNN_MAX_CPU_ISA=AVX2` when a library switch keeps kernels below AVX-512, else None."""
    for name, values in BELOW_AVX512.items():
        if env.get(name, "").strip().lower() in values:
            return f"{name}={env[name].strip()}"
    return None


def cpu_info(text: str | None = None) -> dict:
    """CPU model, family/model numbers and the ISA flags of interest, from /proc/cpuinfo (`text`: its content);
    without AVX-512 / AMX when isa_limit() keeps the kernels below them."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    limit = isa_limit()
    info = {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "isa": [f for f in ISA if f in flags and not (limit and f.startswith(("avx512", "amx")))]}
    return {**info, "isa_limit": limit} if limit else info


def machine(threads: int | str | None = None) -> dict:
    """The record a speed figure travels with: cpu_info, logical CPUs usable here, and the compute threads used."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return {**cpu_info(), "cpus": usable, "threads": threads}


def machine_line(record: dict) -> str:
    """`Intel(R) Xeon(R) Processor (model 167), 2 CPUs, 2 threads, avx2 avx512f ... amx_bf16`."""
    model = f" (family {record.get('cpu_family')} model {record.get('cpu_model')})" if record.get("cpu_model") else ""
    isa = " ".join(record.get("isa") or []) or "no AVX2"
    if record.get("isa_limit"):
        isa += f" (kernels limited: {record['isa_limit']})"
    threads = record.get("threads")
    threads = f"{threads} threads" if isinstance(threads, int) else f"threads: {threads}"
    return f"{record.get('cpu')}{model}, {record.get('cpus')} CPUs, {threads}, {isa}"


def cpu_times(text: str | None = None, cpus: list[int] | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of the CPUs `cpus` (None: all) from /proc/stat (`text`: its content)."""
    if text is None:
        text = Path("/proc/stat").read_text()
    wanted = {f"cpu{n}" for n in cpus} if cpus is not None else {"cpu"}
    busy = total = 0
    for line in text.splitlines():
        name, *values = line.split()
        if name in wanted:
            fields = [int(x) for x in values[:8]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy, total = busy + sum(fields) - idle, total + sum(fields)
    return busy, total


def busy_cpus(cpus: list[int] | None = None, seconds: float = 0.25) -> float:
    """How many of `cpus` (None: all) other processes keep busy now (this process is idle while it measures): the
    CPUs this process may run on, not the whole host (a container's share of a large machine)."""
    try:
        busy0, total0 = cpu_times(cpus=cpus)
        time.sleep(seconds)
        busy1, total1 = cpu_times(cpus=cpus)
    except (OSError, ValueError, IndexError):
        return 0.0
    n = len(cpus) if cpus is not None else os.cpu_count() or 1
    return n * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def threads_for(cpus: int, busy: float) -> int:
    """Compute threads that do not share a core with a busy process: torch's parallel regions wait for their slowest
    thread, so one thread descheduled by another process stalls them all (measured on 2 cores: hf sampling 106 tok/s
    alone fell to 12.5 beside one busy process with 2 threads, 60 with 1)."""
    return max(1, min(cpus, cpus - round(busy)))


if __name__ == "__main__":
    print(machine_line(machine()))
