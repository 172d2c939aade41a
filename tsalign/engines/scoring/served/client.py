"""HTTP for served teachers: bounded concurrency, timeouts, retries with exponential backoff.

    client = ServedClient("http://127.0.0.1:8000", api_key=None, concurrency=8, timeout_s=60, retries=5)
    for job, answer in client.post_many("/v1/chat/completions", jobs, body_of):   # answers as they arrive
        ...

A 429, a 5xx or a connection error is retried (waiting backoff_s * 2^attempt, or a 429's Retry-After);
when the retries are spent, or on any other HTTP error (400, 401, 404...), it raises one TsalignError
naming the endpoint: never a default answer; a URL that is not http(s) fails at once. A 200 whose body
is not JSON comes back as Answer(body=None, garbage="not JSON: ..."): the caller counts it and gives
that item no verdict.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx

from tsalign.errors import TsalignError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})  # and any other 5xx
MAX_WAIT_S = 60.0  # one wait is never longer, whatever Retry-After says


def retryable(status: int) -> bool:
    return status in RETRY_STATUS or 500 <= status < 600


def backoff_delay(attempt: int, base_s: float, retry_after: str | None = None, jitter: float = 0.0) -> float:
    """Seconds before retry number `attempt` (0-based): base * 2^attempt (+ jitter share), or the
    server's Retry-After in seconds when it gives one; capped at MAX_WAIT_S."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), MAX_WAIT_S)
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return min(base_s * (2 ** attempt) * (1.0 + jitter), MAX_WAIT_S)


def endpoint(base_url: str, path: str) -> str:
    """base_url + path, where an OpenAI-style base ending in /v1 is not doubled (".../v1" + "/v1/chat/...")."""
    base = base_url.rstrip("/")
    if path.startswith("/v1/") and base.endswith("/v1"):
        path = path[3:]
    return base + path


@dataclass
class Answer:
    body: Any  # the parsed JSON; None when the server answered garbage
    garbage: str | None  # why the body could not be read
    seconds: float
    retries: int


class ServedClient:
    def __init__(self, base_url: str, api_key: str | None = None, concurrency: int = 8, timeout_s: float = 60.0,
                 retries: int = 5, backoff_s: float = 1.0):
        if concurrency < 1:
            raise TsalignError(f"teacher.served.concurrency={concurrency} must be >= 1")
        self.base_url, self.concurrency, self.retries, self.backoff_s = base_url, concurrency, retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False)
        self._stop = threading.Event()  # set when one job failed: the others stop retrying

    def post(self, path: str, body: dict) -> Answer:
        """One JSON POST with retries (see the module docstring)."""
        url = endpoint(self.base_url, path)
        t0, last, retry_after = time.perf_counter(), "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(backoff_delay(attempt - 1, self.backoff_s, retry_after, random.random() * 0.25))
                retry_after = None
            if self._stop.is_set():
                raise TsalignError(f"served teacher {url}: stopped (another request failed)")
            try:
                r = self.http.post(url, json=body)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:  # no retry mends a URL: say so at once
                raise TsalignError(f"teacher.served.base_url={self.base_url} is not an http(s) URL ({e}): write it "
                                   "as http://HOST:PORT") from None
            except httpx.TransportError as e:  # refused, reset, timed out
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if r.status_code == 200:
                try:
                    return Answer(r.json(), None, time.perf_counter() - t0, attempt)
                except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                    return Answer(None, not_json(r), time.perf_counter() - t0, attempt)
            if not retryable(r.status_code):
                raise TsalignError(f"served teacher {url} answered HTTP {r.status_code}: {short(r.text)}; "
                                   f"{hint(r.status_code)}")
            last, retry_after = f"HTTP {r.status_code}", r.headers.get("retry-after")
        raise TsalignError(f"served teacher {url} failed after {self.retries + 1} tries ({last}); is the server up? "
                           "raise teacher.served.retries or teacher.served.timeout_s, or lower teacher.served.concurrency")

    def post_many(self, path: str, jobs: Iterable, body_of: Callable[[Any], dict]) -> Iterator[tuple[Any, Answer]]:
        """(job, answer) for every job, in the order they finish, at most `concurrency` in flight. A
        failure stops the rest (requests in flight finish, none is retried) and raises."""
        jobs = iter(jobs)
        self._stop.clear()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            running = {}

            def submit() -> bool:
                job = next(jobs, _END)
                if job is _END:
                    return False
                running[pool.submit(self.post, path, body_of(job))] = job
                return True

            while len(running) < self.concurrency and submit():
                pass
            try:
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = running.pop(future)
                        yield job, future.result()
                        submit()
            except BaseException:
                self._stop.set()
                for future in running:
                    future.cancel()
                raise

    def close(self) -> None:
        self.http.close()


_END = object()


def short(text: str, n: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[:n] + "..."


def not_json(r: httpx.Response) -> str:
    """A 200 that is not JSON, as a garbage reason naming what came instead (an HTML page says a wrong URL)."""
    kind = r.headers.get("content-type", "no content-type").split(";")[0]
    try:
        text = short(r.text, 60)
    except (UnicodeDecodeError, LookupError):
        text = f"{len(r.content)} bytes"
    return f"not JSON: HTTP 200 {kind} {text!r}"


def hint(status: int) -> str:
    if status in (401, 403):
        return "check the API key (teacher.served.api_key_env names the variable that holds it)"
    if status == 404:
        return "check teacher.served.base_url, teacher.served.api and teacher.served.model (the served model name)"
    if status == 400:
        return "check the request options (teacher.served.*) and teacher.max_length against the server's context"
    return "check the server"
