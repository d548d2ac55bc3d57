"""A scriptable OpenAI-compatible chat completions server on loopback, for tests.

Real HTTP (``ThreadingHTTPServer`` in a background thread, HTTP/1.1 keep-alive), so
the code under test runs its real client, timeouts and connection pool. Tests queue
canned replies, in order, and read back every request received::

    with OpenAIStub() as stub:
        stub.push(completion('{"ok": true}', prompt_tokens=10, completion_tokens=2))
        ...  # call stub.base_url + "/chat/completions"
        assert stub.requests[0].body["model"] == "m"

A request that finds the queue empty gets a 500 saying so, which fails the test loudly.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One canned behaviour: wait ``delay`` seconds, then answer ``status`` with ``body``."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    """One request as received."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: Any
    """The JSON body, parsed (None when there was none or it was not JSON)."""
    client_port: int
    """Source port: equal ports mean one reused connection."""


def completion(
    content: str | None,
    *,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    delay: float = 0.0,
) -> Reply:
    """A successful chat completion whose message content is ``content``."""
    return Reply(
        body={
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": "stub",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
        delay=delay,
    )


def error(status: int, message: str = "stub error", headers: dict[str, str] | None = None) -> Reply:
    """An error in OpenAI's shape."""
    return Reply(status=status, body={"error": {"message": message}}, headers=headers or {})


def rate_limited(retry_after: str | None) -> Reply:
    """A 429, with a Retry-After header when ``retry_after`` is set."""
    return error(429, "rate limited", {"Retry-After": retry_after} if retry_after else None)


class OpenAIStub:
    """The server; a context manager that starts and stops it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: deque[Reply] = deque()
        self._requests: list[Request] = []
        # Set on stop, so a reply sleeping in its delay ends instead of outliving the test.
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _handler_class(self))
        # serve_forever notices shutdown only between polls: a short poll keeps
        # stopping (once per test) from costing half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), name="openai-stub", daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def start(self) -> OpenAIStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _take(self, request: Request) -> Reply:
        with self._lock:
            self._requests.append(request)
            if self._replies:
                return self._replies.popleft()
        return error(500, "openai stub: no canned reply left")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up before a delayed reply is expected here.
        pass


def _handler_class(stub: OpenAIStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            reply = stub._take(
                Request(
                    method="POST",
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    client_port=self.client_address[1],
                )
            )
            if reply.delay and stub._stopping.wait(reply.delay):
                self.close_connection = True
                return
            data = b"" if reply.body is None else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
