"""A real HTTP receiver for webhook tests: answers from a script, verifies every signature with
the `standardwebhooks` library, and records what it got."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook


@dataclass
class Reply:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0  # seconds to wait before answering (a slow endpoint)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float
    verified_by: list[str]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    """Replies from `script` in order (then `default`); every request must verify with every secret."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets
        self.script: list[Reply] = []
        self.default = Reply()
        self.received: list[Received] = []
        self.unverified: list[str] = []
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                verified.append(secret)
            except Exception as exc:  # recorded: the test asserts none
                self.unverified.append(f"{secret[:10]}: {exc!r}")
        with self.lock:
            self.received.append(Received(headers, body, time.monotonic(), verified))
            reply = self.script.pop(0) if self.script else self.default
        if reply.hang:
            self.released.wait(reply.hang)
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("content-length", "0")
            handler.end_headers()
        except OSError:
            pass  # the sender is gone (a killed worker)


@contextmanager
def receiving(secrets: list[str]) -> Iterator[Receiver]:
    receiver = Receiver(secrets)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.released.set()
        server.shutdown()
        server.server_close()
