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
