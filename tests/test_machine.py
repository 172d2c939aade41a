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
