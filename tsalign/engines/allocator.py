"""glibc's allocator told to keep freed blocks for reuse instead of handing them back to the kernel.

A CPU decode step allocates and frees tensors of a few MB to tens of MB (the KV cache grown by one token, its copy
for grouped-query attention). Above glibc's mmap threshold each one is a fresh mapping the kernel zero-fills page by
page: 39 million minor page faults in one make run, and hf sampling of long prompts at 39 tok/s. With the threshold
at glibc's ceiling (32 MB) and the trim threshold at twice it (what glibc's own dynamic threshold sets), the same
prompts sample at 64 tok/s with a lower peak RSS (1.49 against 1.78 GB; BENCHMARKS.md "Per machine"). vLLM-CPU asks
for tcmalloc for the same reason.

    keep_freed_memory()   # this process (mallopt) and every process it starts (the environment glibc reads)
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def keep_freed_memory(environ=os.environ) -> bool:
    """True when set here; False where the user chose (these variables, or another allocator in LD_PRELOAD) or the C
    library is not glibc."""
    if sys.platform != "linux" or any(name in environ for name in ENV):
        return False
    if any(name in environ.get("LD_PRELOAD", "") for name in OTHER_ALLOCATORS):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    environ.update(ENV)
    return True
