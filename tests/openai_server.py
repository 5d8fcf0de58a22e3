"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests.

Tests exercise the real `openai` client over real HTTP instead of patching it, so retries, timeouts, headers and
usage accounting are tested the way they happen in production. The server answers `POST /v1/chat/completions`
with whatever the script says, records every request, and shuts itself down after `lifetime_s` even if a test
forgets to, so a failing test cannot leave a thread serving forever.

Scripts:
- a list of `Reply` (consumed in arrival order; the last one repeats once the list is used up), or
- a callable `request_json -> Reply | (status, body[, delay])`, e.g. `PerKeyScript`, which picks the reply by a
  marker string found in the request's messages; this keeps scripts deterministic under concurrent clients.

    with OpenAIServer([Reply.text("Rating: [[8]]")]) as server:
        cfg = LLMClientConfig(base_url=server.url, ...)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union


def completion_body(text: str, prompt_tokens: int = 11, completion_tokens: int = 7, model: str = "test-model") -> dict:
    """A chat.completion object as the OpenAI API returns it."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, kind: str = "server_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


@dataclass
class Reply:
    status: int = 200
    body: Union[dict, str] = field(default_factory=dict)
    delay: float = 0.0
    headers: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, text: str, prompt_tokens: int = 11, completion_tokens: int = 7, delay: float = 0.0) -> "Reply":
        return cls(200, completion_body(text, prompt_tokens, completion_tokens), delay)

    @classmethod
    def rate_limited(cls, retry_after: Optional[str] = "1") -> "Reply":
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(429, error_body("Rate limit reached", "rate_limit_exceeded"), 0.0, headers)

    @classmethod
    def server_error(cls, status: int = 500) -> "Reply":
        return cls(status, error_body("The server had an error"), 0.0)

    @classmethod
    def client_error(cls, status: int = 400, message: str = "Invalid request") -> "Reply":
        return cls(status, error_body(message, "invalid_request_error"), 0.0)

    @classmethod
    def slow(cls, seconds: float, text: str = "late") -> "Reply":
        return cls.text(text, delay=seconds)


ScriptResult = Union[Reply, Tuple[int, Union[dict, str]], Tuple[int, Union[dict, str], float]]
Script = Union[Sequence[Reply], Callable[[dict], ScriptResult]]


@dataclass
class RecordedRequest:
    path: str
    headers: Dict[str, str]
    json: Any
    time: float


def message_text(request_json: Mapping) -> str:
    """All text of a chat request's messages, for matching markers."""
    parts: List[str] = []
    for msg in request_json.get("messages", []) or []:
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


class PerKeyScript:
    """Reply sequence per marker: the first marker (in dict order) found in the request's LAST message selects a
    sequence; each request for it takes the next reply, the last one repeats. Unmatched requests get `default`.

    Matching only the last message matters for few-shot prompts, whose earlier turns are the same for every sample.
    """

    def __init__(self, replies: Mapping[str, Sequence[Reply]], default: Optional[Reply] = None):
        self._replies = {k: list(v) for k, v in replies.items()}
        self._next = {k: 0 for k in replies}
        self._default = default or Reply.server_error(500)
        self._lock = threading.Lock()
        self.hits: Dict[str, int] = {k: 0 for k in replies}

    def __call__(self, request_json: dict) -> Reply:
        messages = request_json.get("messages") or [{}]
        last = message_text({"messages": messages[-1:]})
        with self._lock:
            for marker, seq in self._replies.items():
                if marker in last:
                    i = min(self._next[marker], len(seq) - 1)
                    self._next[marker] += 1
                    self.hits[marker] += 1
                    return seq[i]
        return self._default


class OpenAIServer:
    """Context manager serving a script on an ephemeral port; `url` is the base_url for the OpenAI client."""

    def __init__(self, script: Script, *, lifetime_s: float = 60.0, max_requests: int = 500):
        self._script = script
        self._queue_pos = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests: List[RecordedRequest] = []
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    # -- scripting -------------------------------------------------------------------------------------------------
    def _next_reply(self, request_json: dict) -> Reply:
        if callable(self._script):
            out = self._script(request_json)
        else:
            with self._lock:
                seq = list(self._script)
                if not seq:
                    return Reply.server_error(500)
                out = seq[min(self._queue_pos, len(seq) - 1)]
                self._queue_pos += 1
        if isinstance(out, Reply):
            return out
        status, body, *rest = out
        return Reply(int(status), body, float(rest[0]) if rest else 0.0)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: Union[dict, str], headers: Mapping[str, str] = ()) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else str(body)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in dict(headers).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout); nothing to deliver

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    payload = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    payload = None
                with server._lock:
                    server.requests.append(
                        RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, payload, time.time())
                    )
                    over = len(server.requests) > server.max_requests
                if over:
                    return self._send(503, {"error": {"message": "test server request cap reached"}})
                if not self.path.rstrip("/").endswith("/chat/completions") or not isinstance(payload, dict):
                    return self._send(404, {"error": {"message": f"unknown path {self.path}"}})
                reply = server._next_reply(payload)
                if reply.delay > 0 and server._stop.wait(reply.delay):
                    return  # shutting down: drop the connection
                self._send(reply.status, reply.body, reply.headers)

        return Handler

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> "OpenAIServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.requests)
