"""The machine beside every speed figure: /proc/cpuinfo read into a CPU model and the ISA flags that pick kernels,
and generate's manifest recording it with the engine and dtype."""

from __future__ import annotations

from tsalign.engines.machine import cpu_info, machine, machine_line

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 fma avx avx2 bmi2
processor\t: 1
model name\t: (the second CPU is not read)
"""


def test_cpu_info_reads_the_model_and_the_isa_flags_that_matter():
    info = cpu_info(EPYC)
    assert info == {"cpu": "AMD EPYC 7B13", "cpu_family": "25", "cpu_model": "1", "isa": ["avx2", "fma"]}
    line = machine_line({**info, "cpus": 2, "threads": 2})
    assert line == "AMD EPYC 7B13 (family 25 model 1), 2 CPUs, 2 threads, avx2 fma"
    assert cpu_info("")["isa"] == [] and "no AVX2" in machine_line({**cpu_info(""), "cpus": 1, "threads": 1})


XEON = """model name\t: Intel(R) Xeon(R) Processor
cpu family\t: 6
model\t\t: 167
flags\t\t: fma avx2 avx512f avx512bw avx512_bf16 amx_bf16
"""


def test_library_switches_below_avx512_take_its_flags_out(monkeypatch):
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_info(XEON)["isa"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "DEFAULT")  # oneDNN's DEFAULT: no limit
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert "isa_limit" not in cpu_info(XEON) and "amx_bf16" in cpu_info(XEON)["isa"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = cpu_info(XEON)
    assert info["isa"] == ["avx2", "fma"] and info["isa_limit"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert machine_line({**info, "cpus": 2, "threads": 2}).endswith("avx2 fma (kernels limited: ONEDNN_MAX_CPU_ISA=AVX2)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # ATen's default: no SIMD at all
    assert cpu_info(XEON)["isa_limit"] == "ATEN_CPU_CAPABILITY=default"


def test_the_avx2_kernels_runner_limits_torch_onednn_and_vllms_probes():
    import subprocess
    import sys
    from pathlib import Path

    runner = Path(__file__).resolve().parents[1] / "benchmarks" / "avx2_kernels" / "run"
    code = ("import torch; from tsalign.engines.machine import machine, machine_line; "
            "print(torch.backends.cpu.get_cpu_capability(), torch.cpu._is_avx512_supported(), "
            "torch.cpu._is_amx_tile_supported()); print(machine_line(machine()))")
    out = subprocess.run([str(runner), sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    probes, line = out.stdout.splitlines()
    assert probes == "AVX2 False False" and "avx512" not in line.split("(kernels")[0] and "kernels limited" in line


def test_this_machine_is_described():
    record = machine(threads=3)
    assert record["threads"] == 3 and record["cpus"] >= 1 and record["cpu"]


def test_generate_records_the_machine_beside_its_speed(run_stage):
    _, manifest = run_stage("generate", ["sampler.max_new_tokens=4"])
    counts = manifest["counts"]
    assert counts["engine"] == "hf" and counts["engine_dtype"] == "float32" and counts["tokens_per_s"] > 0
    assert counts["machine"]["isa"] == cpu_info()["isa"] and isinstance(counts["machine"]["threads"], int)


def test_cpu_times_and_threads_beside_busy_processes():
    from tsalign.engines.machine import cpu_times, threads_for

    # user nice system idle iowait irq softirq steal
    stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 60 0 20 300 20 0 0 0\ncpu1 40 0 30 500 30 0 0 0\nintr 5\n"
    assert cpu_times(stat) == (150, 1000)
    assert cpu_times(stat, [1]) == (70, 600) and cpu_times(stat, [0, 1]) == (150, 1000)
    assert threads_for(2, 0.0) == 2 and threads_for(2, 0.4) == 2  # a quiet machine: every CPU
    assert threads_for(2, 1.0) == 1 and threads_for(2, 3.0) == 1  # one busy: the free one; never 0
    assert threads_for(16, 2.2) == 14


def test_a_stage_uses_the_cpus_no_other_process_keeps_busy(compose, tmp_path, monkeypatch, capsys):
    import torch

    import tsalign.engines.machine as machine_module
    import tsalign.stages.engine_pick
    from tsalign.stages.engine_pick import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(tsalign.stages.engine_pick.os, "sched_getaffinity", lambda pid: {0, 1})
    try:
        monkeypatch.setattr(machine_module, "busy_cpus", lambda cpus: 1.0)
        set_threads(compose(["stage=generate", f"paths.outputs={tmp_path}"]))
        assert torch.get_num_threads() == 1 and "threads: 1 of 2 CPUs" in capsys.readouterr().out
        monkeypatch.setattr(machine_module, "busy_cpus", lambda cpus: 0.1)
        set_threads(compose(["stage=generate", f"paths.outputs={tmp_path}"]))
        assert torch.get_num_threads() == 2
        assert "VLLM_CPU_OMP_THREADS_BIND" not in tsalign.stages.engine_pick.os.environ  # vLLM keeps its own binding
        set_threads(compose(["stage=generate", "threads=1", f"paths.outputs={tmp_path}"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_freed_memory_is_kept_for_reuse_unless_the_user_chose_an_allocator():
    """glibc's mmap and trim thresholds raised for this process and, through the environment, the ones it starts."""
    import subprocess
    import sys

    from tsalign.engines.allocator import ENV, keep_freed_memory

    code = ("import os; from tsalign.engines.allocator import ENV, keep_freed_memory; "
            "print(keep_freed_memory(), all(os.environ.get(k) == v for k, v in ENV.items()))")
    clean = {k: v for k, v in __import__("os").environ.items() if k not in ENV and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr
    mine = {**clean, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=mine, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr  # the user's own threshold stays
    environ = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
    assert keep_freed_memory(environ) is False and environ == {"LD_PRELOAD": environ["LD_PRELOAD"]}
