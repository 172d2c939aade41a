"""Start and stop a local vLLM OpenAI-compatible server (for tests and benchmarks; in production the
server is yours). Waits for /health; stops it with terminate, wait, kill on timeout.

    with vllm_server(model_dir, "judge", ["--max-model-len", "2048", "--dtype", "bfloat16"]) as url:
        ...   # url = http://127.0.0.1:<free port>
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tsalign.errors import TsalignError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """terminate, wait, kill on timeout (vLLM's engine core is a child: SIGTERM lets the server take it down)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def vllm_server(model_dir: str | Path, name: str, args: list[str] = (), start_timeout_s: float = 300.0,
                kv_cache_gib: int = 1) -> Iterator[str]:
    """A vLLM server for `model_dir` served as `name` on 127.0.0.1 (a free port); yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", *args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))}
    log = tempfile.NamedTemporaryFile("w+", prefix=f"vllm-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise TsalignError(f"vLLM server for {model_dir} exited ({proc.returncode}) before it was ready; "
                                   f"see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            if time.time() > deadline:
                raise TsalignError(f"vLLM server for {model_dir} not ready after {start_timeout_s:.0f}s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()
