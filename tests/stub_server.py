"""A stub served teacher for tests: an HTTP server on 127.0.0.1 (port 0) that answers like an
OpenAI-compatible judge (/v1/chat/completions), vLLM's /classify and /score, and OpenRLHF's remote
reward model (/reward), and misbehaves on demand. It counts every request on the server side.

    with StubTeacher() as stub:
        stub.faults += ["429", "500"]        # the next two requests fail, then it answers again
        stub.always = "html"                 # every request after the listed faults (a web page, HTTP 200)
        ... stub.url, stub.requests, stub.max_in_flight

The judge prefers the longer response: P(A) = sigmoid((len(A) - len(B)) / 10), given as the
log-probabilities of " A" and " B" among top_logprobs (mode "logprobs"), as the answer text only
(mode "text") or by token id (when the request sends logprob_token_ids). Reward = len(response) / 100.
Faults: "html" answers HTTP 200 with a web page (a base_url pointing at a proxy's front page);
"few_rewards" gives a reward model's answer one reward short.
Bounded: it answers at most `max_requests` requests (503 after, counted in `overflow`) and shuts
itself down after `max_seconds`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# the template the stub can read (tests use it as teacher.judge_prompt)
TEMPLATE = "Request: {prompt}\n<A>{response_a}</A>\n<B>{response_b}</B>\nBetter (A or B):"
FAULTS = ("ok", "429", "500", "slow", "drop", "garbage", "no_choice", "401", "html", "few_rewards")
HTML = b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body>It works</body></html>"


def judge_p_a(content: str) -> float:
    """P(A wins) for a question in TEMPLATE's shape or in conf/teacher/served_judge.yaml's."""
    both = re.search(r"<A>(.*?)</A>\n<B>(.*?)</B>", content, re.S) or re.search(
        r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nBetter response", content, re.S)
    la, lb = (len(both.group(1)), len(both.group(2))) if both else (0, 0)
    return 1.0 / (1.0 + math.exp(-(la - lb) / 10.0))


class StubTeacher:
    def __init__(self, mode: str = "logprobs", delay_s: float = 0.0, slow_s: float = 2.0, max_requests: int = 500,
                 max_seconds: float = 120.0):
        self.mode, self.delay_s, self.slow_s = mode, delay_s, slow_s
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.requests: list[tuple[str, dict, dict]] = []  # (path, body, headers)
        self.answered: list[dict] = []  # bodies whose answer was sent in full
        self.faults: list[str] = []  # consumed one per request, in order
        self.always = "ok"  # the fault of every request once `faults` is used up
        self.overflow = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StubTeacher:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                stub.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.timer = threading.Timer(self.max_seconds, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ answering

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = {}
        with self.lock:
            self.requests.append((h.path, body, dict(h.headers)))
            if len(self.requests) > self.max_requests:
                self.overflow += 1
                fault = "503"
            else:
                fault = self.faults.pop(0) if self.faults else self.always
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s + (self.slow_s if fault == "slow" else 0.0))
            if fault == "drop":
                h.close_connection = True
                h.connection.shutdown(2)  # no answer at all: the client sees the connection go
                return
            if fault in ("429", "500", "503", "401"):
                return self.send(h, int(fault), {"error": {"message": f"stub {fault}"}},
                                 {"Retry-After": "0"} if fault == "429" else None)
            if fault == "garbage":
                return self.send(h, 200, b"{not json at all")
            if fault == "html":
                return self.send(h, 200, HTML, content_type="text/html; charset=utf-8")
            answer = self.answer(h.path, body, fault == "no_choice")
            if answer is not None and fault == "few_rewards":
                answer = few_rewards(answer)
            if answer is None:
                return self.send(h, 404, {"error": {"message": f"no route {h.path}"}})
            self.send(h, 200, answer)
            with self.lock:
                self.answered.append(body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def send(self, h, status: int, payload, headers: dict | None = None,
             content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def answer(self, path: str, body: dict, no_choice: bool) -> dict | None:
        usage = {"prompt_tokens": 10, "completion_tokens": 1}
        if path.endswith("/chat/completions"):
            content = body["messages"][-1]["content"]
            p = min(max(judge_p_a(content), 1e-6), 1 - 1e-6)
            text = "I cannot decide." if no_choice else ("A" if p > 0.5 else "B")
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            if no_choice:
                choice["logprobs"] = {"content": [{"token": "I", "logprob": -0.1,
                                                   "top_logprobs": [{"token": "I", "logprob": -0.1}]}]}
            elif body.get("logprob_token_ids"):
                ids = body["logprob_token_ids"]
                tops = [{"token": f"token_id:{ids[0]}", "logprob": math.log(p)},
                        {"token": f"token_id:{ids[1]}", "logprob": math.log(1 - p)}]
                choice["logprobs"] = {"content": [{**tops[0 if p > 0.5 else 1], "top_logprobs": tops}]}
            elif self.mode == "logprobs":
                tops = [{"token": " A", "logprob": math.log(p)}, {"token": " B", "logprob": math.log(1 - p)},
                        {"token": "The", "logprob": -9.0}]
                choice["logprobs"] = {"content": [{**tops[0 if p > 0.5 else 1], "top_logprobs": tops}]}
            return {"id": "stub", "object": "chat.completion", "choices": [choice], "usage": usage}
        if path == "/classify":
            texts = body["input"] if "input" in body else [body["messages"][-1]["content"]]
            return {"data": [{"index": i, "probs": [len(t) / 100]} for i, t in enumerate(texts)], "usage": usage}
        if path == "/score":
            return {"data": [{"index": i, "score": len(t) / 100} for i, t in enumerate(body["text_2"])],
                    "usage": usage}
        if path == "/reward":
            return {"rewards": [len(t) / 100 for t in body["query"]]}
        return None


def few_rewards(answer: dict) -> dict:
    """A reward model's answer one reward short (a server that drops a text of the batch)."""
    if "rewards" in answer:
        return {**answer, "rewards": answer["rewards"][:-1]}
    return {**answer, "data": answer["data"][:-1]} if "data" in answer else answer
