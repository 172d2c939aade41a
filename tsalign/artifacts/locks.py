"""One builder per shared cache entry, across processes (sweep jobs, SLURM tasks on shared storage).

    build_once(target, is_built, build, what)

Atomic renames already keep every cache file whole; the lock keeps two jobs on an empty cache from
both spending minutes building the same entry (a GGUF conversion, a teacher fit, a download). The
second job waits, then finds the entry built and uses it. A lock dies with its process (kill -9 too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

T = TypeVar("T")


def lock_path(target: Path) -> Path:
    """The lock file beside `target` (hidden, so cache listings stay clean)."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def cache_lock(target: str | Path, what: str = "") -> Iterator[None]:
    """Hold the cross-process lock of the cache entry `target`; say so once when another process has it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(target))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[tsalign] waiting for another process building {what or target.name} ({target})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(target: str | Path, is_built: Callable[[], bool], build: Callable[[], T], what: str = "") -> T | None:
    """Run `build()` unless `is_built()`; checked again under the lock, so of several processes racing on
    an empty cache exactly one builds and the others wait and reuse. Returns build()'s value, or None
    when nothing was built."""
    if is_built():
        return None
    with cache_lock(target, what):
        if is_built():  # another process built it while we waited
            return None
        return build()
